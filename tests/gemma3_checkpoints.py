"""Tiny random Gemma 3 checkpoints, built offline for tests.

The text model has four layers, local ones with an 8-token window around a global
one (`sliding_window_pattern` 3: local, local, global, local), so that prompts of a
few dozen tokens already attend differently in the two kinds; the global layers'
rotary embedding is linearly scaled and the local ones keep their own base, as in the
released checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from tests.checkpoints import _randomise, _save, build_tokenizer

SLIDING_WINDOW = 8
ROPE_PARAMETERS = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
}


def gemma3_text_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> Gemma3TextConfig:
    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        query_pre_attn_scalar=20,
        sliding_window=SLIDING_WINDOW,
        sliding_window_pattern=3,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_parameters={kind: dict(params) for kind, params in ROPE_PARAMETERS.items()},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Gemma3TextConfig(**(fields | overrides))


def make_tiny_gemma3_text(out_dir: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A 4-layer Gemma3ForCausalLM; `overrides` go to Gemma3TextConfig."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(with_image_token=False)
    model = Gemma3ForCausalLM(gemma3_text_config(tokenizer, **overrides))
    _randomise(model, seed)
    return _save(model, tokenizer, Path(out_dir))
