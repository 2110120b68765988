"""What the bare decode loops (bench/gpt2_loop.py, bench/llama_loop.py) share: a static
KV cache with its attention, and the greedy loop. No paging, no scheduler: the floor a
serving engine's per-step overhead is measured against."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from app.engine.sampling.kernels import argmax


class StaticKVCache:
    """Keys and values of every layer: [layers, batch, kv_heads, max_len, head_dim], once."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_layers, batch_size, kv_heads, max_len, head_dim)
        self.keys = torch.empty(shape, dtype=dtype)
        self.values = torch.empty(shape, dtype=dtype)

    def attend(
        self,
        index: int,
        start: int,
        query: torch.Tensor,  # [B, heads, T, head_dim]
        key: torch.Tensor,  # [B, kv_heads, T, head_dim]
        value: torch.Tensor,
    ) -> torch.Tensor:  # [B, heads, T, head_dim]
        """Store layer `index`'s new keys and values at `start`, then attend the new
        queries over the cache and themselves, causally."""
        end = start + key.shape[2]
        self.keys[index, :, :, start:end] = key
        self.values[index, :, :, start:end] = value
        keys, values = self.keys[index, :, :, :end], self.values[index, :, :, :end]
        # A prefill starts at 0 (plain causal mask); a decode step sees the whole cache.
        return F.scaled_dot_product_attention(
            query,
            keys,
            values,
            is_causal=key.shape[2] > 1,
            enable_gqa=query.shape[1] != key.shape[1],
        )


# (input_ids [B, T], start) -> logits [B, vocab] of each row's last position
Forward = Callable[[torch.Tensor, int], torch.Tensor]


@torch.inference_mode()
def greedy_decode(forward: Forward, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """prompt_ids [B, P] -> the next `new_tokens` greedy tokens of every row [B, new_tokens]."""
    batch, prompt_len = prompt_ids.shape
    tokens = torch.empty(batch, new_tokens, dtype=torch.long)
    tokens[:, 0] = argmax(forward(prompt_ids, 0))
    for step in range(1, new_tokens):
        tokens[:, step] = argmax(forward(tokens[:, step - 1 : step], prompt_len + step - 1))
    return tokens
