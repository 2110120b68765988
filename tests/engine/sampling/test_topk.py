"""The block top k against torch.topk: the same values, indices that hold them."""

from __future__ import annotations

import pytest
import torch

from app.engine.sampling.kernels import MIN_BLOCKS_PER_K, TOPK_BLOCK, topk


def assert_same_as_torch(values: torch.Tensor, k: int) -> None:
    expected = values.topk(k, dim=-1).values
    top, indices = topk(values, k)
    assert torch.equal(top, expected)
    assert torch.equal(values.gather(1, indices), top)  # each index holds its value
    assert all(len(set(row)) == k for row in indices.tolist())  # no index twice


@pytest.mark.parametrize("k", [1, 5, 20, 50])
# with and without a tail
@pytest.mark.parametrize("vocab", [50257, 64 * TOPK_BLOCK, 8 * TOPK_BLOCK + 3])
def test_the_k_largest_of_random_rows(k: int, vocab: int) -> None:
    generator = torch.Generator().manual_seed(k * vocab)
    assert_same_as_torch(torch.randn(7, vocab, generator=generator), k)


def test_a_rows_largest_values_bunched_in_one_block_or_in_the_tail() -> None:
    """Every large value in a single block, or in the last, shorter one, which the block
    maxima alone would rank as one block among many."""
    vocab, k = 50257, 20
    rows = torch.rand(3, vocab, generator=torch.Generator().manual_seed(0))
    rows[0, 640 : 640 + TOPK_BLOCK] += 10.0  # one block holds all k
    rows[1, -(vocab % TOPK_BLOCK) :] += 10.0  # the tail holds them
    rows[2, ::TOPK_BLOCK] += 10.0  # one in every block
    assert_same_as_torch(rows, k)


def test_ties_and_masked_values() -> None:
    vocab, k = 64 * TOPK_BLOCK + 5, 8
    rows = torch.zeros(3, vocab)  # row 0: all tied
    rows[1] = float("-inf")  # row 1: three finite values among -inf
    rows[1, [3, 700, vocab - 1]] = torch.tensor([1.0, 2.0, 3.0])
    rows[2] = torch.arange(vocab) % 5  # ties at every value
    assert_same_as_torch(rows, k)


def test_too_few_blocks_for_k_takes_torch_topk() -> None:
    vocab = MIN_BLOCKS_PER_K * TOPK_BLOCK * 3
    values = torch.randn(2, vocab)
    assert_same_as_torch(values, 4)  # the block path
    assert_same_as_torch(values, 4 * 3)  # torch's: too few blocks
    assert topk(values, 0)[0].shape == (2, 0)
