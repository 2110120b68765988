"""Matrix products in the orientation this CPU runs fastest, measured when a model loads.

`x @ weight.T` and `(weight @ x.T).T` are the same numbers, but MKL picks different kernels
for them and which wins for a few rows depends on the machine: a float32 model too big for
cache times both on its own weights at 1 to 16 rows (`decode_product`) and keeps the faster
per row count (weight-major, one row is padded to two: a single column would take the
one-core GEMV); one that fits keeps F.linear, whose numbers then depend on no timing. The
output layer goes weight-major from eight rows (`logits`), and one float32 row on an AVX-512
CPU takes the kernels' own row product (`one_row_product`). Timings: BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from models import cpu_kernels

logger = logging.getLogger(__name__)

CALIBRATED_ROWS = (1, 2, 4, 8, 16)  # a count in between follows the next one up
WEIGHT_MAJOR_MAX_ROWS = CALIBRATED_ROWS[-1]  # from 24 rows the two are within a few percent
# The smaller machine's L3 is 32 MiB: a model under it decodes from cache.
STREAMED_WEIGHT_BYTES = 32 << 20
# Timing more than this much of a bigger model's weights tells nothing new (it streams).
CALIBRATION_BYTES = 1 << 30
CALIBRATION_REPEATS = 3  # the faster of each orientation's best of 3 passes
TRANSPOSED_LOGITS_MIN_ROWS = 8  # from here on the output layer is faster weight-major

# x [..., in], weight [out, in], bias [out] or None -> x @ weight.T + bias
Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class PreparedWeight(Protocol):
    """A matrix [out, in] kept in a form of its own (int8, a library's layout) that
    computes its own product; `models.cpu_weights.PreparedProduct` calls it."""

    shape: torch.Size

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


# (rows, product) -> seconds for one pass of `product` over the weights with `rows` rows
PassTimer = Callable[[int, Product], float]


class OrientedLinear:
    """F.linear on fp32 CPU weights [out, in], taken weight-major at the chosen row counts."""

    def __init__(self, weight_major_rows: Iterable[int]) -> None:
        self.weight_major_rows = frozenset(weight_major_rows)
        # (in_features, dtype) -> a zero row pair [2, in] as its first row [1, in] and its
        # columns [in, 2]: one row is copied into the first, since a single column would
        # take the GEMV, and repeat() costs several ops per product.
        # NOTE: shared by every call, so one thread at a time (the engine's) runs them
        self.padded_rows: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        # by_rows[n]: whether n rows go weight-major, for n up to WEIGHT_MAJOR_MAX_ROWS
        self.by_rows = [False] + [
            min(c for c in CALIBRATED_ROWS if c >= n) in self.weight_major_rows
            for n in range(1, WEIGHT_MAJOR_MAX_ROWS + 1)
        ]

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        num_rows = x.numel() // x.shape[-1]
        if num_rows > WEIGHT_MAJOR_MAX_ROWS or not self.by_rows[num_rows]:
            return F.linear(x, weight, bias)
        # a decode step's inputs are already [rows, in]: no reshape or view ops for them
        rows = x if x.dim() == 2 else x.reshape(num_rows, x.shape[-1])
        if num_rows == 1 and not rows.requires_grad:
            columns = self._padded_columns(rows)
        else:  # repeat: a fresh tensor, which autograd may keep for the backward
            columns = (rows.repeat(2, 1) if num_rows == 1 else rows.contiguous()).t()
        product = _weight_major(columns, weight, bias, num_rows)  # [rows, out]
        return product if x.dim() == 2 else product.view(*x.shape[:-1], weight.shape[0])

    def _padded_columns(self, row: torch.Tensor) -> torch.Tensor:  # [1, in] -> [in, 2]
        key = (row.shape[-1], row.dtype)
        if key not in self.padded_rows:
            with torch.inference_mode(False):  # writable inside inference mode and out
                pair = torch.zeros(2, row.shape[-1], dtype=row.dtype, device=row.device)
            self.padded_rows[key] = (pair[:1], pair.t())
        first_row, columns = self.padded_rows[key]
        first_row.copy_(row)
        return columns

    def __repr__(self) -> str:
        return f"OrientedLinear(weight_major_rows={sorted(self.weight_major_rows)})"


def _weight_major(
    columns: torch.Tensor,  # [in, columns], a view of row-major rows: the layout MKL splits
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_rows: int,  # the leading columns that are real rows (one row is padded to two)
) -> torch.Tensor:  # [num_rows, out], contiguous
    if bias is None:
        product = torch.mm(weight, columns)
    else:
        product = torch.addmm(bias.unsqueeze(1), weight, columns)  # [out, columns]
    rows = product.t()
    return (rows if num_rows == columns.shape[1] else rows[:num_rows]).contiguous()


ALWAYS_WEIGHT_MAJOR = OrientedLinear(CALIBRATED_ROWS)


def decode_product(weights: Iterable[torch.Tensor]) -> Product:
    """The product a model's layers use: F.linear, or for fp32 CPU weights that stream from
    memory at every decode step, whichever orientation measured faster at each row count.

    `weights` are every tensor a decode step reads, in order, the output layer last.
    """
    weights = list(weights)
    fp32_cpu = all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights)
    if not weights or not fp32_cpu or _num_bytes(weights) < STREAMED_WEIGHT_BYTES:
        return F.linear
    started = time.perf_counter()
    matrices = [w for w in weights if w.dim() == 2]  # norms and biases take no product
    chosen = weight_major_rows(pass_timer(_calibration_set(matrices)))
    logger.info(
        "matrix products: weight-major at %s rows, plain otherwise (measured in %.2f s)",
        sorted(chosen) or "no",
        time.perf_counter() - started,
    )
    return OrientedLinear(chosen) if chosen else F.linear


def weight_major_rows(timer: PassTimer) -> list[int]:
    """The calibrated row counts at which weight-major passes were the faster ones.

    The two orientations alternate, so that a noisy moment of the machine falls on both.
    """
    chosen: list[int] = []
    for rows in CALIBRATED_ROWS:
        plain = weight_major = math.inf
        for _ in range(CALIBRATION_REPEATS):
            plain = min(plain, timer(rows, F.linear))
            weight_major = min(weight_major, timer(rows, ALWAYS_WEIGHT_MAJOR))
        if weight_major < plain:
            chosen.append(rows)
    return chosen


def pass_timer(weights: Sequence[torch.Tensor]) -> PassTimer:
    """Times one product of `rows` random rows with every weight, in order, as a decode
    step meets them: the last one, the output layer, only below TRANSPOSED_LOGITS_MIN_ROWS
    rows, since from there on `logits` takes it weight-major whatever the product."""
    inputs = {w.shape[1]: torch.randn(WEIGHT_MAJOR_MAX_ROWS, w.shape[1]) for w in weights}

    @torch.inference_mode()
    def timed_pass(rows: int, product: Product) -> float:
        met = weights if rows < TRANSPOSED_LOGITS_MIN_ROWS else weights[:-1]
        started = time.perf_counter()
        for weight in met:
            product(inputs[weight.shape[1]][:rows], weight, None)
        return time.perf_counter() - started

    return timed_pass


def _calibration_set(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The weights in order up to CALIBRATION_BYTES (at least one), plus the last (the
    output layer, often the biggest single product)."""
    chosen: list[torch.Tensor] = []
    total = 0
    for weight in weights[:-1]:
        if chosen and total >= CALIBRATION_BYTES:
            break
        chosen.append(weight)
        total += _num_bytes([weight])
    return [*chosen, weights[-1]]


def _num_bytes(weights: Iterable[torch.Tensor]) -> int:
    return sum(w.numel() * w.element_size() for w in weights)


def logits(
    hidden: torch.Tensor,
    lm_head: torch.Tensor | PreparedWeight,
    product: Product,
    row_major: bool = False,
) -> torch.Tensor:
    """hidden [N, hidden] @ lm_head.T -> [N, vocab]: a transposed view where that is faster,
    unless `row_major`."""
    if not isinstance(lm_head, torch.Tensor):
        return lm_head.linear(hidden, None)
    if takes_one_row(hidden, lm_head):
        return one_row_product(hidden, lm_head, None)
    transposed_is_faster = hidden.shape[0] >= TRANSPOSED_LOGITS_MIN_ROWS
    if lm_head.device.type == "cpu" and transposed_is_faster and not row_major:
        return torch.mm(lm_head, hidden.t()).t()
    return product(hidden, lm_head, None)


def takes_one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """`one_row_product` runs this product: one float32 CPU row [1, in], a plain float32
    weight, and a CPU with AVX-512 that loaded the kernels."""
    return (
        x.dim() == 2
        and x.shape[0] == 1
        and x.dtype == weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.is_contiguous()
        and not x.requires_grad
        and cpu_kernels.float_rows_available()
    )


def one_row_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [1, in] @ weight.T + bias by the kernels' row product (models/cpu_kernels/
    float_rows.h): a dot product per weight row, in memory order, on torch's threads. For
    one row it ran well ahead of both of MKL's orientations (BENCHMARKS.md)."""
    return torch.ops.mmgpt.float_linear(x.contiguous(), weight, bias)


class Int8Weight:
    """A weight [out, in] stored as int8, with one symmetric scale per output row: the
    portable int8 form (CUDA, or a CPU without FBGEMM; models/cpu_weights.py has the CPU's).

    `values * scales[:, None]` approximates the float weight; activations stay in the
    model's dtype (weight-only quantisation): each product widens the int8 matrix to the
    activations' dtype and scales the product per output column.
    """

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        self.values = values  # [out, in] int8
        self.scales = scales  # [out], the model's dtype
        self.shape = values.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        """Per-output-channel symmetric: each row's largest magnitude maps to 127."""
        row_max = weight.detach().float().abs().amax(dim=1).clamp(min=1e-12)  # [out]
        scales = row_max / 127.0
        values = torch.round(weight.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(values, scales.to(weight.dtype))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scaled = F.linear(x, self.values.to(x.dtype)) * self.scales  # [..., out]
        return scaled if bias is None else scaled + bias
