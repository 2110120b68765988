"""Products in the CPU's faster orientation are F.linear's numbers, in F.linear's layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.linear import (
    STREAMED_WEIGHT_BYTES,
    TRANSPOSED_LOGITS_MIN_ROWS,
    WEIGHT_MAJOR_MAX_ROWS,
    decode_product,
    linear,
    logits,
    weight_major,
)

OUT, IN = 1024, 256
# Outputs are sums of 256 unit-normal products (about 16 in size); the two kernels add them
# in different orders, so they differ by a few fp32 roundings of that size.
CLOSE = {"rtol": 1e-5, "atol": 1e-4}


@pytest.fixture
def weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(OUT, IN)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_major_rows_match_f_linear(weight: torch.Tensor, rows: int, with_bias: bool) -> None:
    assert weight_major(rows, weight)
    x, bias = torch.randn(rows, IN), torch.randn(OUT) if with_bias else None
    got = linear(x, weight, bias)
    assert got.shape == (rows, OUT) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight, bias), **CLOSE)


def test_leading_dims_and_strided_input_are_kept(weight: torch.Tensor) -> None:
    x = torch.randn(2, 3, 2 * IN)[..., ::2]  # 6 rows, not contiguous
    got = linear(x, weight)
    assert got.shape == (2, 3, OUT) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight), **CLOSE)


@pytest.mark.parametrize(
    ("rows", "dtype", "expected"),
    [
        (1, torch.float32, True),
        (WEIGHT_MAJOR_MAX_ROWS, torch.float32, True),
        (WEIGHT_MAJOR_MAX_ROWS + 1, torch.float32, False),  # prefills and big batches
        (1, torch.bfloat16, False),  # oneDNN prefers the plain form
    ],
)
def test_which_products_go_weight_major(rows: int, dtype: torch.dtype, expected: bool) -> None:
    assert weight_major(rows, torch.empty(OUT, IN, dtype=dtype)) is expected


def test_only_models_that_stream_from_memory_take_it() -> None:
    layer = torch.empty(STREAMED_WEIGHT_BYTES // 4 // IN // 2, IN)  # half the bar each
    assert decode_product([layer, layer]) is linear
    assert decode_product([layer]) is F.linear  # stays in cache
    assert decode_product([layer, layer.bfloat16(), layer]) is F.linear  # not all fp32


def test_many_rows_keep_f_linear_exactly(weight: torch.Tensor) -> None:
    x = torch.randn(WEIGHT_MAJOR_MAX_ROWS + 1, IN)
    assert torch.equal(linear(x, weight), F.linear(x, weight))


@pytest.mark.parametrize("rows", [1, 4, TRANSPOSED_LOGITS_MIN_ROWS - 1, TRANSPOSED_LOGITS_MIN_ROWS])
def test_logits_at_every_row_count(weight: torch.Tensor, rows: int) -> None:
    hidden = torch.randn(rows, IN)
    got = logits(hidden, weight, linear)
    assert got.shape == (rows, OUT)
    # From TRANSPOSED_LOGITS_MIN_ROWS rows on the result is a transposed view.
    assert got.is_contiguous() is (rows < TRANSPOSED_LOGITS_MIN_ROWS)
    torch.testing.assert_close(got, F.linear(hidden, weight), **CLOSE)
