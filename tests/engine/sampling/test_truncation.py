"""top_k, top_p and min_p as masks over a row's logits, against their definitions."""

from __future__ import annotations

import pytest
import torch

from app.engine.sampling.truncation import (
    TOP_P_CANDIDATES,
    mask_min_p,
    mask_top_k,
    mask_top_k_top_p,
    nucleus_limit,
)
from tests.engine.sampling.rows import kept, probs_logits


def test_top_k_keeps_the_k_largest_and_their_ties() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    mask_top_k(logits, [2, 5])
    assert kept(logits) == [[1, 2, 3], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize(
    ("top_p", "expected"), [(0.45, [0]), (0.65, [0, 1]), (0.75, [0, 1, 2]), (1.0, [0, 1, 2, 3, 4])]
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, expected: list[int]) -> None:
    logits = probs_logits([0.5, 0.2, 0.15, 0.1, 0.05])
    mask_top_k_top_p(logits, [5], [top_p])
    assert kept(logits) == [expected]


def test_top_p_applies_to_the_top_k_renormalised_distribution() -> None:
    logits = probs_logits([0.15, 0.5, 0.05, 0.2, 0.1])
    # After top_k=3: {1: .588, 3: .235, 0: .176}; mass before token 0 is .824 >= .8.
    mask_top_k_top_p(logits, [3], [0.8])
    assert kept(logits) == [[1, 3]]


def _top_p_by_full_sort(logits: torch.Tensor, top_p: list[float]) -> list[list[int]]:
    """The definition: sort every token, keep those with less than the nucleus limit (top_p
    less the boundary margin) of the mass before them."""
    sorted_probs, order = logits.softmax(dim=-1).double().sort(dim=-1, descending=True)
    limits = torch.tensor([nucleus_limit(p) for p in top_p], dtype=torch.float64).unsqueeze(1)
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < limits
    keep[:, 0] = True
    rows = zip(order, keep, strict=True)
    return [sorted(row_order[row_keep].tolist()) for row_order, row_keep in rows]


def test_top_p_over_a_large_vocabulary_matches_a_full_sort() -> None:
    """Peaked rows find their cut among the first candidates, flat ones need every token."""
    vocab = 8 * TOP_P_CANDIDATES
    generator = torch.Generator().manual_seed(11)
    scales = torch.tensor([[8.0], [0.1], [3.0], [0.01]])  # peaked, flat, between, flatter
    logits = torch.randn(4, vocab, generator=generator) * scales
    top_p = [0.9, 0.9, 0.99, 0.5]
    expected = _top_p_by_full_sort(logits, top_p)
    assert len(expected[0]) < TOP_P_CANDIDATES < len(expected[1])  # both paths are taken
    mask_top_k_top_p(logits, [vocab] * 4, top_p)
    assert kept(logits) == expected


@pytest.mark.parametrize("vocab", [5, 4 * TOP_P_CANDIDATES])  # the cut among candidates, or not
def test_top_p_keeps_every_token_as_likely_as_the_last_one_in(vocab: int) -> None:
    """A sort orders ties arbitrarily: the nucleus keeps all of a tie or none of it."""
    logits = torch.full((1, vocab), -30.0)  # the rest: about 1e-13 each
    logits[0, :5] = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0])
    # probabilities about .69, .09, .09, .09, .03, ...: the first four hold .87 >= .8, the
    # first two .78, so the nucleus ends inside the tie of tokens 1, 2 and 3
    mask_top_k_top_p(logits, [vocab], [0.8])
    assert kept(logits) == [[0, 1, 2, 3]]
    flat = torch.zeros(1, vocab)  # every token ties: all of them stay
    mask_top_k_top_p(flat, [vocab], [0.5])
    assert kept(flat) == [list(range(vocab))]


def test_min_p_keeps_tokens_above_a_fraction_of_the_largest() -> None:
    logits = probs_logits([0.5, 0.2, 0.15, 0.1, 0.05])
    mask_min_p(logits, [0.25])  # threshold 0.125
    assert kept(logits) == [[0, 1, 2]]
