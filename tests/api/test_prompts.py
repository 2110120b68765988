"""Prompt building: chat template, image token expansion, caption and QA, completions."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from app.errors import APIError
from app.prompts import PromptBuilder, image_message
from models.base import ModelInfo
from tests.checkpoints import CHAT_TEMPLATE, build_tokenizer

IMAGE_SEQ_LENGTH = 5


def _info(tokenizer: Any, multimodal: bool) -> ModelInfo:
    image_token = tokenizer.convert_tokens_to_ids("<image>") if multimodal else None
    return ModelInfo(
        name="tiny", architecture="Test", num_layers=1, num_kv_heads=1, head_dim=8,
        hidden_size=8, vocab_size=len(tokenizer), max_model_len=256, dtype=torch.float32,
        device=torch.device("cpu"), eos_token_ids=(tokenizer.eos_token_id,),
        bos_token_id=tokenizer.bos_token_id, image_token_id=image_token,
        image_seq_length=IMAGE_SEQ_LENGTH if multimodal else 0, caption_prompt="Describe it.",
    )  # fmt: skip


@pytest.fixture(scope="module")
def llava() -> PromptBuilder:
    tokenizer = build_tokenizer(with_image_token=True)
    return PromptBuilder(tokenizer, _info(tokenizer, multimodal=True), CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def text_only() -> PromptBuilder:
    tokenizer = build_tokenizer(with_image_token=False)
    return PromptBuilder(tokenizer, _info(tokenizer, multimodal=False), None)


def _status(call: Any) -> int:
    with pytest.raises(APIError) as caught:
        call()
    return caught.value.status_code


def test_caption_renders_the_template_and_expands_the_image(llava: PromptBuilder) -> None:
    ids = llava.caption(None)
    image_token = llava.info.image_token_id
    assert ids.count(image_token) == IMAGE_SEQ_LENGTH
    first = ids.index(image_token)
    assert ids[first : first + IMAGE_SEQ_LENGTH] == [image_token] * IMAGE_SEQ_LENGTH
    text = llava.decode([t for t in ids if t != image_token])
    assert text == "<s>USER: \nDescribe it.\nASSISTANT:"
    assert ids.count(llava.tokenizer.bos_token_id) == 1  # the template's BOS, not a second one


def test_question_and_custom_caption_prompt(llava: PromptBuilder) -> None:
    assert "what colour" in llava.decode(llava.question("what colour is it"))
    assert "the shapes" in llava.decode(llava.caption("the shapes"))


def test_chat_with_two_images_and_text_only_turns(llava: PromptBuilder) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}],
        },
    ]
    ids = llava.chat(messages)
    assert ids.count(llava.info.image_token_id) == 2 * IMAGE_SEQ_LENGTH


def test_image_token_typed_in_text_is_expanded_for_the_engine_to_refuse(
    llava: PromptBuilder,
) -> None:
    """One image, two runs of image tokens: the engine's count check (tests/engine/
    test_validation.py) refuses the prompt. Completions, which take no images, refuse it here."""
    sneaky = llava.chat(image_message("look: <image>"))
    assert sneaky.count(llava.info.image_token_id) == 2 * IMAGE_SEQ_LENGTH
    assert _status(lambda: llava.completion("<image> hi")) == 400


def test_completion_prompts(llava: PromptBuilder) -> None:
    ids = llava.completion("the red circle")
    assert ids[0] == llava.tokenizer.bos_token_id
    assert llava.completion([5, 6, 7]) == [5, 6, 7]


def test_text_only_model_expands_nothing_and_needs_a_template(text_only: PromptBuilder) -> None:
    assert text_only.chat([{"role": "user", "content": "hi"}])  # the tokenizer's template
    no_template = PromptBuilder(text_only.tokenizer, text_only.info, None)
    no_template.chat_template = None
    assert _status(lambda: no_template.chat([{"role": "user", "content": "hi"}])) == 400


def test_template_errors_are_bad_requests(llava: PromptBuilder) -> None:
    strict = PromptBuilder(
        llava.tokenizer, llava.info, "{{ raise_exception('roles must alternate') }}"
    )
    assert _status(lambda: strict.chat([{"role": "user", "content": "x"}])) == 400
