"""Products in either orientation are F.linear's numbers, in F.linear's layout; the
orientation is the one a model's own weights measured faster at each row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.linear
from models import cpu_kernels
from models.linear import (
    ALWAYS_WEIGHT_MAJOR,
    CALIBRATED_ROWS,
    STREAMED_WEIGHT_BYTES,
    TRANSPOSED_LOGITS_MIN_ROWS,
    WEIGHT_MAJOR_MAX_ROWS,
    OrientedLinear,
    Product,
    decode_product,
    logits,
    one_row_product,
    pass_timer,
    takes_one_row,
    weight_major_rows,
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
    x, bias = torch.randn(rows, IN), torch.randn(OUT) if with_bias else None
    got = _counting_weight_major(ALWAYS_WEIGHT_MAJOR, x, weight, bias)
    assert got.shape == (rows, OUT) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight, bias), **CLOSE)


def test_leading_dims_and_strided_input_are_kept(weight: torch.Tensor) -> None:
    x = torch.randn(2, 3, 2 * IN)[..., ::2]  # 6 rows, not contiguous
    got = ALWAYS_WEIGHT_MAJOR(x, weight)
    assert got.shape == (2, 3, OUT) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight), **CLOSE)


def test_one_row_reuses_its_padding_without_sharing_results(weight: torch.Tensor) -> None:
    product = OrientedLinear((1,))
    rows = [torch.randn(1, IN) for _ in range(3)]
    with torch.inference_mode():
        inside = [product(row, weight) for row in rows]
    outside = [product(row, weight) for row in rows]
    assert len(product.padded_rows) == 1  # one kept pair for every call
    for row, got_inside, got_outside in zip(rows, inside, outside, strict=True):
        torch.testing.assert_close(got_inside, F.linear(row, weight), **CLOSE)
        assert torch.equal(got_inside, got_outside)


def test_one_row_with_autograd_keeps_its_gradient(weight: torch.Tensor) -> None:
    row = torch.randn(1, IN, requires_grad=True)
    ALWAYS_WEIGHT_MAJOR(row, weight).sum().backward()
    assert row.grad is not None
    torch.testing.assert_close(row.grad, weight.sum(0, keepdim=True), **CLOSE)


def _counting_weight_major(product: OrientedLinear, *args: torch.Tensor | None) -> torch.Tensor:
    """product(*args), asserting that it took the weight-major path."""
    taken = []
    real = models.linear._weight_major

    def counting(*inner: torch.Tensor | None) -> torch.Tensor:
        taken.append(True)
        return real(*inner)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models.linear, "_weight_major", counting)
        result = product(*args)  # type: ignore[arg-type]
    assert taken
    return result


@pytest.mark.parametrize(
    ("chosen", "rows", "expected"),
    [
        ((1, 2), 1, True),
        ((1, 2), 2, True),
        ((1, 2), 3, False),  # 3 follows the measurement at 4
        ((8,), 5, True),  # 5 to 7 follow the measurement at 8
        ((8,), 4, False),
        (CALIBRATED_ROWS, WEIGHT_MAJOR_MAX_ROWS + 1, False),  # prefills and big batches
    ],
)
def test_row_counts_between_measurements_follow_the_next_one_up(
    chosen: tuple[int, ...], rows: int, expected: bool
) -> None:
    product = OrientedLinear(chosen)
    assert (rows <= WEIGHT_MAJOR_MAX_ROWS and product.by_rows[rows]) is expected


def test_plain_rows_are_exactly_f_linear(weight: torch.Tensor) -> None:
    product = OrientedLinear((8,))
    for rows in (1, 4, WEIGHT_MAJOR_MAX_ROWS + 1):
        x = torch.randn(rows, IN)
        assert torch.equal(product(x, weight), F.linear(x, weight))


def test_calibration_keeps_the_faster_orientation_per_row_count() -> None:
    """A timer in which weight-major wins at 1 and 8 rows only, with noise on one pass."""
    seen: list[tuple[int, bool]] = []

    def timer(rows: int, product: Product) -> float:
        weight_major = product is ALWAYS_WEIGHT_MAJOR
        seen.append((rows, weight_major))
        if rows == 4 and weight_major and seen.count((4, True)) == 1:
            return 0.0  # one lucky pass does not decide: the best of the plain ones does
        faster = rows in (1, 8, 4) if weight_major else rows == 2
        return 1.0 if faster else 2.0

    assert weight_major_rows(timer) == [1, 4, 8]
    assert {rows for rows, _ in seen} == set(CALIBRATED_ROWS)
    assert sum(major for _, major in seen) == len(seen) // 2  # both orientations, alike


def test_a_measured_pass_runs_every_weight_with_the_rows_asked(weight: torch.Tensor) -> None:
    calls: list[tuple[int, int]] = []

    def product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append((x.shape[0], w.shape[0]))
        return F.linear(x, w, bias)

    small = torch.randn(16, IN)
    assert pass_timer([weight, small])(3, product) > 0
    assert calls == [(3, OUT), (3, 16)]
    calls.clear()  # where `logits` takes the output layer weight-major, it is not timed
    assert pass_timer([weight, small])(TRANSPOSED_LOGITS_MIN_ROWS, product) > 0
    assert calls == [(TRANSPOSED_LOGITS_MIN_ROWS, OUT)]


def test_only_models_that_stream_from_memory_are_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measured: list[int] = []

    def chosen(timer: object) -> list[int]:
        measured.append(1)
        return [2, 4]

    monkeypatch.setattr(models.linear, "weight_major_rows", chosen)
    layer = torch.empty(STREAMED_WEIGHT_BYTES // 4 // IN // 2, IN)  # half the bar each
    product = decode_product([layer, layer])
    assert isinstance(product, OrientedLinear) and product.weight_major_rows == {2, 4}
    assert decode_product([layer]) is F.linear  # stays in cache
    assert decode_product([layer, layer.bfloat16(), layer]) is F.linear  # not all fp32
    assert measured == [1]
    monkeypatch.setattr(models.linear, "weight_major_rows", lambda timer: [])
    assert decode_product([layer, layer]) is F.linear  # plain won everywhere


def test_calibration_times_a_bounded_prefix_and_the_output_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models.linear, "CALIBRATION_BYTES", 3 * OUT * IN * 4)
    layers = [torch.empty(OUT, IN) for _ in range(5)]
    lm_head = torch.empty(7, IN)
    timed = models.linear._calibration_set([*layers, lm_head])
    assert [t is w for t, w in zip(timed, [*layers[:3], lm_head], strict=True)] == [True] * 4


@pytest.mark.parametrize("rows", [1, 4, TRANSPOSED_LOGITS_MIN_ROWS - 1, TRANSPOSED_LOGITS_MIN_ROWS])
def test_logits_at_every_row_count(weight: torch.Tensor, rows: int) -> None:
    hidden = torch.randn(rows, IN)
    got = logits(hidden, weight, ALWAYS_WEIGHT_MAJOR)
    assert got.shape == (rows, OUT)
    # From TRANSPOSED_LOGITS_MIN_ROWS rows on the result is a transposed view.
    assert got.is_contiguous() is (rows < TRANSPOSED_LOGITS_MIN_ROWS)
    torch.testing.assert_close(got, F.linear(hidden, weight), **CLOSE)
    rows_asked = logits(hidden, weight, ALWAYS_WEIGHT_MAJOR, row_major=True)
    assert rows_asked.is_contiguous()
    torch.testing.assert_close(rows_asked, F.linear(hidden, weight), **CLOSE)


needs_float_rows = pytest.mark.skipif(
    not cpu_kernels.float_rows_available(), reason="no AVX-512, or no kernels"
)


@needs_float_rows
@pytest.mark.parametrize("shape", [(OUT, IN), (37, 100), (130, 17), (3, 8)])  # tails
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_row_product_is_f_linears(shape: tuple[int, int], with_bias: bool) -> None:
    torch.manual_seed(3)
    weight, x = torch.randn(*shape), torch.randn(1, shape[1])
    bias = torch.randn(shape[0]) if with_bias else None
    assert takes_one_row(x, weight)
    ours = one_row_product(x, weight, bias)
    torch.testing.assert_close(ours, F.linear(x, weight, bias), **CLOSE)
    several = torch.randn(3, shape[1])  # the op takes several rows, each on its own
    torch.testing.assert_close(
        torch.ops.mmgpt.float_linear(several, weight, bias),
        F.linear(several, weight, bias),
        **CLOSE,
    )


@needs_float_rows
def test_the_row_product_serves_the_output_layers_one_row(
    weight: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = models.linear.one_row_product

    def counted(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, w, bias)

    monkeypatch.setattr(models.linear, "one_row_product", counted)
    hidden = torch.randn(1, IN)
    torch.testing.assert_close(logits(hidden, weight, F.linear), F.linear(hidden, weight), **CLOSE)
    logits(torch.randn(2, IN), weight, F.linear)  # two rows: the model's product
    assert calls == [1]


@needs_float_rows
def test_what_the_row_product_leaves_to_the_others(weight: torch.Tensor) -> None:
    row = torch.randn(1, IN)
    assert not takes_one_row(torch.randn(2, IN), weight)
    assert not takes_one_row(row.bfloat16(), weight.bfloat16())
    assert not takes_one_row(row, weight.t().contiguous().t())  # not contiguous
    assert not takes_one_row(row.requires_grad_(), weight)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.mmgpt.float_linear(torch.randn(1, IN).double(), weight, None)
    with pytest.raises(RuntimeError, match=r"\[rows, in\]"):
        torch.ops.mmgpt.float_linear(torch.randn(1, IN + 1), weight, None)
