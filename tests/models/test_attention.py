"""Paged attention against a plain per-sequence softmax attention."""

from __future__ import annotations

import random

import pytest
import torch

from models.attention import (
    PLAN_KEY,
    allocate_kv_cache,
    paged_attention,
    prepare_attention,
)
from models.base import AttentionMetadata, cache_slots
from tests.models.paged import flat_metadata

BLOCK_SIZE = 4
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8


def _metadata(
    context_lens: list[int], query_lens: list[int], tables: list[list[int]]
) -> AttentionMetadata:
    return flat_metadata(context_lens, query_lens, tables, BLOCK_SIZE)


def test_cache_slots_are_each_positions_block_and_offset() -> None:
    table = [7, 2, 9]  # blocks out of order, as a real table's are
    for start in range(len(table) * BLOCK_SIZE):
        for end in range(start, len(table) * BLOCK_SIZE + 1):
            expected = [
                table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)
            ]
            assert cache_slots(table, start, end, BLOCK_SIZE) == expected


def _naive(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, context: int
) -> torch.Tensor:
    """query [q, H, D] against the whole sequence's keys/values [context + q, KV, D]."""
    group = HEADS // KV_HEADS
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", query, keys) * HEAD_DIM**-0.5
    allowed = torch.arange(keys.shape[0])[None, :] <= torch.arange(context, keys.shape[0])[:, None]
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, values).reshape(query.shape[0], -1)


@pytest.mark.parametrize(
    ("context_lens", "query_lens"),
    [
        ([7, 0, 30, 2, 61, 5, 44, 3, 9, 50], [1] * 10),  # decodes only, very different lengths
        ([5, 6, 7, 8], [1, 1, 1, 1]),  # decodes only, one group in batch order
        ([12, 0, 3, 0, 40, 6, 1, 2, 33], [1, 9, 1, 6, 1, 5, 1, 1, 1]),  # mixed
    ],
)
def test_paged_attention_matches_plain_attention(
    context_lens: list[int], query_lens: list[int]
) -> None:
    generator = torch.Generator().manual_seed(0)
    free = list(range(64))
    random.Random(0).shuffle(free)
    cache = allocate_kv_cache(
        1, 64, BLOCK_SIZE, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu")
    )[0]
    tables, history, expected, new = [], [], [], []
    for context, count in zip(context_lens, query_lens, strict=True):
        tables.append([free.pop() for _ in range(-(-(context + count) // BLOCK_SIZE))])
        keys, values = (
            torch.randn(context + count, KV_HEADS, HEAD_DIM, generator=generator) for _ in "kv"
        )
        query = torch.randn(count, HEADS, HEAD_DIM, generator=generator)
        history.append((keys[:context], values[:context]))
        new.append((query, keys[context:], values[context:]))
        expected.append(_naive(query, keys, values, context))
    # earlier context goes into the cache first, as previous steps would have left it
    for s, (keys, values) in enumerate(history):
        for p in range(keys.shape[0]):
            slot = tables[s][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
            cache[0].view(-1, KV_HEADS, HEAD_DIM)[slot] = keys[p]
            cache[1].view(-1, KV_HEADS, HEAD_DIM)[slot] = values[p]
    metadata = _metadata(context_lens, query_lens, tables)
    query, key, value = (torch.cat([n[i] for n in new]) for i in range(3))
    out = paged_attention(query, key, value, cache, metadata, HEAD_DIM**-0.5)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_decodes_of_very_different_lengths_are_grouped() -> None:
    context_lens = [3, 4, 5, 6, 60, 61, 62, 63, 7]
    tables = [[i] * 16 for i in range(len(context_lens))]
    metadata = _metadata(context_lens, [1] * len(context_lens), tables)
    plan = prepare_attention(metadata, BLOCK_SIZE)
    assert len(plan.decode_groups) == 2
    assert metadata.extra[PLAN_KEY] is plan
    assert prepare_attention(metadata, BLOCK_SIZE) is plan
