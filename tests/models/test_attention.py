"""Paged attention against a plain per-sequence softmax attention."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from models.attention import allocate_kv_cache, paged_attention
from models.attention_inputs import AttentionInputs, plan_attention
from tests.models.paged import flat_inputs

BLOCK_SIZE = 4
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8


def _inputs(
    context_lens: list[int], query_lens: list[int], tables: list[list[int]]
) -> AttentionInputs:
    return flat_inputs(context_lens, query_lens, tables, BLOCK_SIZE)


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
    attn_inputs = _inputs(context_lens, query_lens, tables)
    query, key, value = (torch.cat([n[i] for n in new]) for i in range(3))
    out = paged_attention(query, key, value, cache, attn_inputs, HEAD_DIM**-0.5, layer=0)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)


def _row_list(rows: slice | torch.Tensor) -> list[int]:
    return list(range(rows.start, rows.stop)) if isinstance(rows, slice) else rows.tolist()


def test_decodes_of_very_different_lengths_are_grouped() -> None:
    context_lens = [3, 4, 5, 6, 60, 61, 62, 63, 7]
    tables = [[i] * 16 for i in range(len(context_lens))]
    attn_inputs = _inputs(context_lens, [1] * len(context_lens), tables)
    groups = [_row_list(group.rows) for group in attn_inputs.decode_groups]
    assert groups == [[4, 5, 6, 7], [1, 2, 3, 8, 0]]
    assert not attn_inputs.is_one_decode_group


def test_decodes_of_similar_lengths_are_one_group_in_batch_order() -> None:
    attn_inputs = _inputs([5, 6, 7, 8], [1] * 4, [[i] * 4 for i in range(4)])
    assert attn_inputs.is_one_decode_group
    assert attn_inputs.decode_groups[0].rows == slice(0, 4)
    beside_a_prompt = _inputs([5, 6, 0], [1, 1, 3], [[i] * 4 for i in range(3)])
    assert not beside_a_prompt.is_one_decode_group


def test_short_block_tables_are_padded_with_the_padding_block() -> None:
    """A group reads as many blocks of each sequence as its longest one has."""
    slot_mapping = torch.tensor([0, 1], dtype=torch.int64)
    attn_inputs = plan_attention([1, 1], [2, 6], [[3], [5, 8]], slot_mapping, BLOCK_SIZE, 99)
    (group,) = attn_inputs.decode_groups
    assert group.block_ids is not None and group.block_ids.tolist() == [3, 99, 5, 8]
    assert group.mask[:, 0, 0].tolist() == [[True] * 3 + [False] * 5, [True] * 7 + [False]]


def test_decode_attention_with_the_additive_mask_is_the_bool_mask_attention() -> None:
    """The step's 0 / -inf mask, made once and shared by the layers, gives SDPA's own
    answers for the bool mask it replaces, bit for bit."""
    slot_mapping = torch.tensor([0, 1], dtype=torch.int64)
    attn_inputs = plan_attention([1, 1], [2, 6], [[3], [5, 8]], slot_mapping, BLOCK_SIZE, 99)
    (group,) = attn_inputs.decode_groups
    additive = group.additive_mask_for(False, torch.float32)
    assert group.additive_mask_for(False, torch.float32) is additive
    assert torch.equal(additive == 0, group.mask) and torch.isinf(additive[~group.mask]).all()
    generator = torch.Generator().manual_seed(0)
    span = group.mask.shape[-1]
    query = torch.randn(2, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM, generator=generator)
    keys, values = (torch.randn(2, KV_HEADS, span, HEAD_DIM, generator=generator) for _ in "kv")
    with_bool = F.scaled_dot_product_attention(query, keys, values, attn_mask=group.mask)
    with_additive = F.scaled_dot_product_attention(query, keys, values, attn_mask=additive)
    assert torch.equal(with_additive, with_bool)
