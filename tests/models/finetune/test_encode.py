"""Token ids and labels: prompts exactly as the server builds them, loss on answers only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.media import preprocess
from app.prompts import PromptBuilder
from models import load_model
from models.finetune.data import Conversation, read_conversations
from models.finetune.encode import IGNORE, PromptFormat, encode_all
from models.finetune.lora import load_prompt_format
from tests.models.finetune.conftest import WriteJsonl, data_url, image_chat, picture


@pytest.fixture(scope="module")
def llava_format(tiny_llava: Path) -> PromptFormat:
    return load_prompt_format(tiny_llava)


def _conversation(record: dict[str, Any], tmp_path: Path, write_jsonl: WriteJsonl) -> Conversation:
    conversations, problems = read_conversations(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert problems == []
    return conversations[0]


def test_prompt_and_pixels_are_what_the_server_builds(
    tiny_llava: Path, llava_format: PromptFormat, tmp_path: Path, write_jsonl: WriteJsonl
) -> None:
    image = picture((10, 200, 30), size=(40, 28))
    record = image_chat("what is it?", data_url(image), "a green box")
    example = llava_format.encode(_conversation(record, tmp_path, write_jsonl))
    loaded = load_model(tiny_llava)
    server = PromptBuilder(loaded.tokenizer, loaded.info, loaded.chat_template)
    template_messages = [
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}, {"type": "image"}]}
    ]
    prompt = server.chat(template_messages)
    assert example.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE for label in example.labels[: len(prompt)])
    answer = example.input_ids[len(prompt) :]
    assert example.labels[len(prompt) :] == answer
    assert server.decode(answer).strip() == "a green box" + loaded.tokenizer.eos_token
    served = preprocess(image, loaded.image_processor).pixel_values
    assert example.pixel_values is not None
    np.testing.assert_array_equal(example.pixel_values[0].numpy(), served)


def test_every_assistant_turn_is_labelled_unless_its_weight_is_zero(
    llava_format: PromptFormat, tmp_path: Path, write_jsonl: WriteJsonl
) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first", "weight": 0},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second"},
    ]
    conversation = _conversation({"messages": messages}, tmp_path, write_jsonl)
    example = llava_format.encode(conversation)
    labelled = [
        t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE
    ]
    tokenizer = llava_format.tokenizer
    assert tokenizer.decode(labelled).strip() == "second" + tokenizer.eos_token
    assert example.pixel_values is None


def test_problems_found_while_encoding_name_their_line(
    llava_format: PromptFormat,
    tmp_path: Path,
    write_jsonl: WriteJsonl,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = data_url(picture((1, 2, 3)))
    records = [
        image_chat("fine", url, "yes"),
        image_chat("a typed <image> token", url, "no"),  # two image tokens, one image
        image_chat("word " * 300, url, "too long"),
        image_chat("refused", data_url(picture((9, 9, 9), size=(31, 17))), "no"),
    ]
    conversations, _ = read_conversations(write_jsonl(tmp_path / "train.jsonl", records))
    processor = llava_format.image_processor

    def picky(images: list[Any], **kwargs: Any) -> Any:
        if images[0].size == (31, 17):
            raise ValueError("odd size")
        return processor(images=images, **kwargs)

    monkeypatch.setattr(llava_format, "image_processor", picky)
    examples, problems = encode_all(llava_format, conversations)
    assert len(examples) == 1
    assert problems[0].startswith("train.jsonl:2: 1 images but the chat template rendered 2")
    assert problems[1].startswith("train.jsonl:3: ") and "at most 256" in problems[1]
    assert problems[2] == "train.jsonl:4: the image processor rejected an image (odd size)"


def test_a_text_model_refuses_images(
    tiny_llama: Path, tmp_path: Path, write_jsonl: WriteJsonl
) -> None:
    record = image_chat("q", data_url(picture((1, 2, 3))), "a")
    conversations, _ = read_conversations(write_jsonl(tmp_path / "t.jsonl", [record]))
    _, problems = encode_all(load_prompt_format(tiny_llama), conversations)
    assert problems == ["t.jsonl:1: the model takes no images"]
