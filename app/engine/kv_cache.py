"""The paged KV cache: how many blocks it gets (sized once, at start, from a memory
budget) and where a sequence's tokens sit in it."""

from __future__ import annotations

import torch

from app.engine.config import EngineConfig
from models.base import ModelInfo

CPU_DEFAULT_MAX_BYTES = 2 << 30  # on CPU, at most 2 GiB unless kv_cache_bytes says otherwise
ACTIVATION_BYTES_PER_TOKEN_FACTOR = 16  # rough peak activations per batched token, in hidden units


def max_model_len(config: EngineConfig, info: ModelInfo) -> int:
    """The longest sequence served: the checkpoint's context, or less when configured."""
    if config.max_model_len is None:
        return info.max_model_len
    return min(config.max_model_len, info.max_model_len)


def kv_cache_budget_bytes(config: EngineConfig, info: ModelInfo) -> int:
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    enough = config.max_num_seqs * max_model_len(config, info) * info.kv_bytes_per_token()
    if info.device.type != "cuda":
        return min(CPU_DEFAULT_MAX_BYTES, enough)
    free_bytes, _ = torch.cuda.mem_get_info(info.device)
    itemsize = torch.empty((), dtype=info.dtype).element_size()
    activations = (
        config.max_num_batched_tokens * info.hidden_size * itemsize
        * ACTIVATION_BYTES_PER_TOKEN_FACTOR
        + config.max_num_seqs * info.vocab_size * 4 * 3  # logits and the sampler's copies
    )  # fmt: skip
    return min(enough, int(free_bytes * config.gpu_memory_utilization) - activations)


def num_kv_blocks(config: EngineConfig, info: ModelInfo) -> int:
    """Blocks that fit the budget; at least one full-length sequence must fit."""
    bytes_per_block = config.block_size * info.kv_bytes_per_token()
    num_blocks = kv_cache_budget_bytes(config, info) // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"the KV cache budget holds no block of {config.block_size} tokens "
            f"({bytes_per_block} bytes each); raise kv_cache_bytes or free device memory"
        )
    return int(num_blocks)


def cache_slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The cache slots (block * block_size + offset) of positions [start, end) of a
    sequence whose blocks are `block_table`, one block-long run at a time."""
    slots: list[int] = []
    position = start
    while position < end:
        offset = position % block_size
        run = min(block_size - offset, end - position)
        base = block_table[position // block_size] * block_size + offset
        slots += range(base, base + run)
        position += run
    return slots
