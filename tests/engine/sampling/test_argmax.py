"""The CPU argmax (numpy, or two passes) against torch.argmax: ties, NaN and -inf included."""

from __future__ import annotations

import pytest
import torch

from app.engine.sampling.kernels import SEARCH_BLOCK, max_and_argmax


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    logits[0, vocab // 3] = logits[0, vocab - 1] = logits[0].max() + 1  # a tie: the first wins
    if rows > 2:
        logits[1, vocab // 2] = float("nan")  # NaN wins, as in torch.argmax
        logits[2] = float("-inf")
        logits[2, vocab - 1] = 0.0  # the only finite logit is in the last, shorter block
    if rows > 3:
        logits[3] = 7.0  # every logit ties
    return logits


@pytest.mark.parametrize(
    "vocab", [SEARCH_BLOCK - 1, SEARCH_BLOCK, SEARCH_BLOCK + 1, 5 * SEARCH_BLOCK, 50257]
)
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 17, 32, 33, 40])
@pytest.mark.parametrize("layout", ["rows", "transposed"])
def test_matches_torch(vocab: int, rows: int, layout: str) -> None:
    logits = _logits(rows, vocab, seed=vocab + rows)
    view = logits if layout == "rows" else logits.t().contiguous().t()  # same values, [V, N]
    values, indices = max_and_argmax(view)
    expected_values, _ = logits.max(dim=-1)
    assert torch.equal(indices, logits.argmax(dim=-1))
    assert torch.equal(values.isnan(), expected_values.isnan())
    finite = ~expected_values.isnan()
    assert torch.equal(values[finite], expected_values[finite])


@pytest.mark.parametrize("rows", [8, 24, 48])
@pytest.mark.parametrize("layout", ["rows", "transposed"])
def test_a_maximum_in_a_later_block_is_found(rows: int, layout: str) -> None:
    logits = torch.zeros(rows, 3 * SEARCH_BLOCK)
    for row in range(rows):
        logits[row, row * 97 % (3 * SEARCH_BLOCK)] = 1.0 + row
    view = logits if layout == "rows" else logits.t().contiguous().t()
    assert max_and_argmax(view)[1].tolist() == [
        row * 97 % (3 * SEARCH_BLOCK) for row in range(rows)
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype: torch.dtype) -> None:
    logits = _logits(4, 50257, seed=3).to(dtype)
    values, indices = max_and_argmax(logits)
    assert torch.equal(indices, logits.argmax(dim=-1))
    assert values.dtype == dtype


def test_a_transposed_view_of_some_rows() -> None:
    logits = _logits(40, 50257, seed=5)
    some = logits.t().contiguous().t()[3:27]  # [24, vocab], strides (1, 40)
    assert torch.equal(max_and_argmax(some)[1], logits[3:27].argmax(dim=-1))
