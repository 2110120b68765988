from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from models.scenes import sample
from models.scenes.tokenizer import CAPTION_PROMPT, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer(range(2_000))


def test_build_is_deterministic(tokenizer: PreTrainedTokenizerBase) -> None:
    assert build_tokenizer(range(2_000)).get_vocab() == tokenizer.get_vocab()


def test_round_trip_of_scene_text(tokenizer: PreTrainedTokenizerBase) -> None:
    unk = tokenizer.unk_token_id
    for seed in range(10_000, 10_200):
        text = sample(seed).text
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert unk not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_saved_tokenizer_loads_with_auto_tokenizer(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = sample(3).caption
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.convert_tokens_to_ids("<image>") != loaded.unk_token_id
    assert loaded.chat_template == tokenizer.chat_template


def test_chat_template_accepts_strings_and_parts(tokenizer: PreTrainedTokenizerBase) -> None:
    parts = [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": parts}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == f"<s><|user|>{CAPTION_PROMPT}<image><|assistant|>"
    plain = tokenizer.apply_chat_template(
        [{"role": "user", "content": CAPTION_PROMPT}], add_generation_prompt=True, tokenize=False
    )
    assert plain == f"<s><|user|>{CAPTION_PROMPT}<|assistant|>"


def test_assistant_turns_end_with_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "user", "content": "what color is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "what size is the red circle?"},
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|assistant|>red</s><|user|>" in rendered
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.bos_token_id) == 1


def test_a_turns_text_comes_before_its_images_in_either_order(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    image, text = {"type": "image"}, {"type": "text", "text": "is there a red circle?"}
    renders = {
        tokenizer.apply_chat_template(
            [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False
        )
        for parts in ([image, text], [text, image])
    }
    assert renders == {"<s><|user|>is there a red circle?<image><|assistant|>"}
