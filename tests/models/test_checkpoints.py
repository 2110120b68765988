"""The test factories themselves: folders that transformers' Auto classes load and run."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from tests.checkpoints import make_tiny_gpt2, make_tiny_llama, make_tiny_llava


def test_tokenizer_round_trips_multibyte_text(tmp_path: Path) -> None:
    folder = make_tiny_gpt2(tmp_path / "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "héllo 東京 😀 straße ✓ zebra"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_sharded_llama_loads_in_transformers(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "llama", shards=3)
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    assert (folder / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape[-1] == model.config.vocab_size


def test_llava_processor_expands_image_tokens(tmp_path: Path) -> None:
    folder = make_tiny_llava(tmp_path / "llava", vision="siglip")
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=Image.new("RGB", (40, 30)), text=prompt, return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    num_image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert num_image_tokens == model.config.image_seq_length == 16
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]
