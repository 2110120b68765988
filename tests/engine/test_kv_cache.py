"""KV cache sizing from a memory budget, and where tokens sit in the cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from app.engine.config import EngineConfig
from app.engine.kv_cache import CPU_DEFAULT_MAX_BYTES, cache_slots, max_model_len, num_kv_blocks
from models.base import ModelInfo

INFO = ModelInfo(
    name="m", architecture="LlamaForCausalLM", num_layers=2, num_kv_heads=2, head_dim=16,
    hidden_size=64, vocab_size=100, max_model_len=256, dtype=torch.float32,
    device=torch.device("cpu"), eos_token_ids=(2,),
)  # fmt: skip
PER_TOKEN = INFO.kv_bytes_per_token()  # 2 (K, V) * 2 layers * 2 heads * 16 * 4 bytes = 512


def test_an_explicit_budget_sets_the_block_count() -> None:
    config = EngineConfig(model="m", block_size=16, kv_cache_bytes=100 * 16 * PER_TOKEN + 7)
    assert PER_TOKEN == 512
    assert num_kv_blocks(config, INFO) == 100


def test_the_cpu_default_holds_every_sequence_at_full_length_up_to_a_cap() -> None:
    config = EngineConfig(model="m", block_size=16, max_num_seqs=8)
    assert num_kv_blocks(config, INFO) == 8 * 256 // 16
    huge = dataclasses.replace(INFO, max_model_len=1 << 20)
    assert num_kv_blocks(config, huge) == CPU_DEFAULT_MAX_BYTES // (16 * PER_TOKEN)


def test_max_model_len_is_the_smaller_of_config_and_checkpoint() -> None:
    assert max_model_len(EngineConfig(model="m"), INFO) == 256
    assert max_model_len(EngineConfig(model="m", max_model_len=100), INFO) == 100
    assert max_model_len(EngineConfig(model="m", max_model_len=1000), INFO) == 256


def test_a_budget_below_one_block_is_an_error() -> None:
    with pytest.raises(ValueError, match="no block"):
        num_kv_blocks(EngineConfig(model="m", kv_cache_bytes=10), INFO)


def test_cache_slots_are_each_positions_block_and_offset() -> None:
    block_size = 4
    table = [7, 2, 9]  # blocks out of order, as a real table's are
    for start in range(len(table) * block_size):
        for end in range(start, len(table) * block_size + 1):
            expected = [
                table[p // block_size] * block_size + p % block_size for p in range(start, end)
            ]
            assert cache_slots(table, start, end, block_size) == expected
