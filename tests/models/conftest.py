"""Tiny checkpoints of every supported architecture, with transformers' own model beside ours."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from models import LoadedModel, load_model
from tests.checkpoints import (
    make_tiny_gpt2,
    make_tiny_llama,
    make_tiny_llava,
    make_tiny_qwen2,
    make_tiny_qwen3,
)
from tests.gemma3_checkpoints import make_tiny_gemma3_text
from tests.torch_threads import intra_op_threads

PROMPT_LENGTHS = (5, 11, 17, 23)


@dataclass
class Case:
    """One checkpoint: our model, the reference, and prompts (token ids, optional image)."""

    folder: Path
    ours: LoadedModel
    reference: Any  # the transformers model
    prompts: list[list[int]]
    pixel_values: list[torch.Tensor | None]  # per prompt, [1, 3, H, W] or None

    @property
    def image_token_id(self) -> int | None:
        return self.ours.info.image_token_id

    def reference_logits(self, index: int, tokens: list[int]) -> torch.Tensor:
        """transformers' logits [len(tokens), vocab] for prompt `index` continued by `tokens`."""
        input_ids = torch.tensor([tokens])
        pixels = self.pixel_values[index]
        with torch.no_grad():
            if pixels is None:
                return self.reference(input_ids=input_ids).logits[0]
            return self.reference(input_ids=input_ids, pixel_values=pixels).logits[0]

    def image_embeds(self, index: int) -> torch.Tensor | None:
        """Our projected embeddings of prompt `index`'s image, [image_seq_length, hidden]."""
        pixels = self.pixel_values[index]
        return None if pixels is None else self.ours.model.encode_images(pixels)[0]


def text_prompts(vocab_size: int, special: set[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    allowed = [t for t in range(vocab_size) if t not in special]
    return [[1, *rng.choices(allowed, k=n - 1)] for n in PROMPT_LENGTHS]


def _text_case(folder: Path) -> Case:
    ours = load_model(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = text_prompts(ours.info.vocab_size, {0, 1, 2})
    return Case(folder, ours, reference, prompts, [None] * len(prompts))


def _llava_case(folder: Path) -> Case:
    ours = load_model(folder)
    reference = AutoModelForImageTextToText.from_pretrained(folder).eval()
    info = ours.info
    assert info.image_token_id is not None
    prompts = text_prompts(info.vocab_size, {0, 1, 2, info.image_token_id})
    image = [info.image_token_id] * info.image_seq_length
    # images at different offsets; the last prompt stays text-only
    prompts[0] = prompts[0][:2] + image + prompts[0][2:]
    prompts[1] = prompts[1][:1] + image + prompts[1][1:]
    prompts[2] = prompts[2][:9] + image + prompts[2][9:]
    generator = torch.Generator().manual_seed(0)
    size = info.image_size
    pixels: list[torch.Tensor | None] = [
        torch.randn(1, 3, size, size, generator=generator) for _ in range(3)
    ]
    return Case(folder, ours, reference, prompts, [*pixels, None])


CASES: dict[str, tuple[Callable[[Path], Path], Callable[[Path], Case]]] = {
    "llama_gqa_untied": (lambda d: make_tiny_llama(d, num_kv_heads=2), _text_case),
    "llama_sharded_tied": (
        lambda d: make_tiny_llama(d, num_kv_heads=4, tie_word_embeddings=True, shards=3),
        _text_case,
    ),
    "llama_bias_head_dim": (
        lambda d: make_tiny_llama(d, head_dim=24, attention_bias=True, mlp_bias=True),
        _text_case,
    ),
    "qwen2_qkv_bias": (make_tiny_qwen2, _text_case),
    "qwen3_qk_norm": (make_tiny_qwen3, _text_case),
    "qwen3_bias_untied": (
        lambda d: make_tiny_qwen3(d, attention_bias=True, tie_word_embeddings=False),
        _text_case,
    ),
    "gpt2_tied": (make_tiny_gpt2, _text_case),
    "gemma3_text_window": (make_tiny_gemma3_text, _text_case),
    "llava_clip": (lambda d: make_tiny_llava(d, vision="clip"), _llava_case),
    "llava_siglip": (lambda d: make_tiny_llava(d, vision="siglip"), _llava_case),
}


@pytest.fixture(autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and stall when the cores are shared."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="session")
def case_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Case]:
    built: dict[str, Case] = {}

    def get(kind: str) -> Case:
        if kind not in built:
            make, wrap = CASES[kind]
            built[kind] = wrap(make(tmp_path_factory.mktemp(kind)))
        return built[kind]

    return get
