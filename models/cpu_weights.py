"""Decoder matrices in a CPU library's own layout, prepared once when a model loads.

- `PackedWeight` (float32, bfloat16): oneDNN's blocked layout, which from two rows up runs
  well ahead of MKL's plain GEMM (it splits a few-row product poorly over two cores).
- `FbgemmInt8Weight`: FBGEMM's packed int8, one scale per output row, activations rounded
  to 8 bits at each product; on a CPU with AVX-512 VNNI maybe its int8 rows too
  (`Int8Rows`), for one-row products without FBGEMM's per-call packing.

A layer's product (`PreparedProduct`) hands these to their own `linear` and every other
weight to the model's float product.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import cache
from pathlib import Path

import torch

from models import cpu_kernels
from models.linear import PreparedWeight, Product, one_row_product, takes_one_row

# The batch size oneDNN lays a packed weight out for: one layout serves every row count,
# and this one was as fast as any from 2 rows and the fastest at 8 to 64.
PACKING_ROWS = 32
KEPT_VIEW_ROWS = 256  # FbgemmInt8Weight keeps its buffer's views for up to this many rows


class PackedWeight:
    """A float32 or bfloat16 weight reordered into oneDNN's blocked layout.

    With `one_row` (a float product) the plain weight is kept beside it for single-row
    products, where MKL's weight-major GEMV measured faster than the packed one in a
    decode step, and the kernels' row product (models/linear.one_row_product) faster
    still; the price is a second copy of the matrix.
    """

    def __init__(self, weight: torch.Tensor, one_row: Product | None = None) -> None:
        self.shape = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKING_ROWS)
        self.plain = weight if one_row is not None else None
        self.one_row = one_row

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.one_row is not None and self.plain is not None and x.numel() == x.shape[-1]:
            if takes_one_row(x, self.plain):
                return one_row_product(x, self.plain, bias)
            return self.one_row(x, self.plain, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    @staticmethod
    def available() -> bool:
        return torch.backends.mkldnn.is_available()


class FbgemmInt8Weight:
    """int8 weights [out, in] in FBGEMM's layout, each row rounded to its own scale.

    Each product quantises its activations dynamically. Every row is scaled to a largest
    magnitude of 1 first, and a fixed row holding -1 and 1 rides along, so the one range
    FBGEMM derives from the whole tensor is [-1, 1] whatever the batch: a row's result
    depends on that row alone, as it does in float. With `one_row` (and VNNI) it keeps the
    int8 rows as well (`Int8Rows`), which compute the same integers for one row without
    FBGEMM's per-call packing (models/cpu_kernels/int8_rows.h).
    """

    def __init__(self, weight: torch.Tensor, one_row: bool = False) -> None:
        self.shape = weight.shape
        float_weight = weight.detach().float()
        scales = (float_weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0).double()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # the quantized-tensor API warns of its future
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch.quantize_per_channel(
                float_weight, scales, zero_points, 0, torch.qint8
            )
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.reduce_range = _reduce_range()
        self.rows = (
            Int8Rows.of(quantized, self.reduce_range)
            if one_row and cpu_kernels.int8_rows_available()
            else None
        )
        # NOTE: kept buffers, shared by every call: one thread at a time (the engine's)
        self._buffer = torch.empty(0)
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.dim() == 2 and x.dtype == torch.float32
        if self.rows is not None and flat and x.shape[0] == 1:
            return self.rows.linear(x, bias)
        rows = x if flat else x.reshape(-1, x.shape[-1]).float()
        peaks = torch.linalg.vector_norm(rows, ord=math.inf, dim=1, keepdim=True)
        peaks.clamp_(min=1e-30)  # an all-zero row stays zero
        with_fixed_row, scaled = self._scaled_rows(rows.shape[0])
        torch.div(rows, peaks, out=scaled)
        product = _LINEAR_DYNAMIC(with_fixed_row, self.packed, self.reduce_range)
        out = product[1:].mul_(peaks)
        if bias is not None:
            out += bias
        return out if flat else out.to(x.dtype).view(*x.shape[:-1], self.shape[0])

    def _scaled_rows(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of a kept buffer: [num_rows + 1, in] whose first row is the fixed [-1, 1]
        one, and its last `num_rows` rows, where the scaled activations go. Decode-sized
        ones are kept, as two view ops cost more than a decode step's activation rounding."""
        if num_rows not in self._views:
            if len(self._buffer) <= num_rows:
                with torch.inference_mode(False):  # writable inside inference mode and out
                    size = max(num_rows + 1, 2 * len(self._buffer))
                    self._buffer = torch.zeros(size, self.shape[1])
                self._buffer[0, 0], self._buffer[0, 1] = -1.0, 1.0
                self._views.clear()
            with_fixed_row = self._buffer[: num_rows + 1]
            if num_rows > KEPT_VIEW_ROWS:
                return with_fixed_row, with_fixed_row[1:]
            self._views[num_rows] = (with_fixed_row, with_fixed_row[1:])
        return self._views[num_rows]

    @staticmethod
    def available() -> bool:
        return "fbgemm" in torch.backends.quantized.supported_engines


_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default


@dataclasses.dataclass(frozen=True)
class Int8Rows:
    """An FBGEMM int8 matrix row by row, for torch.ops.mmgpt.int8_linear: the integers
    FBGEMM multiplies and the float factors it applies, worked out once."""

    weight: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # float32 [out]: the activations' scale times the row's
    offsets: torch.Tensor  # int32 [out]: the activations' zero point times the row's sum
    activation_scale: float
    zero_point: int

    @classmethod
    def of(cls, quantized: torch.Tensor, reduce_range: bool) -> Int8Rows:
        """From a per-row qint8 tensor, with the parameters FBGEMM picks for activations
        in [-1, 1] (FbgemmInt8Weight's rows always span that range)."""
        if reduce_range:
            raise ValueError("the VNNI product rounds activations to all 8 bits")
        activation_scale, zero_point = torch._choose_qparams_per_tensor(
            torch.tensor([-1.0, 1.0]), reduce_range
        )
        weight = quantized.int_repr().contiguous()
        row_scales = quantized.q_per_channel_scales().float()
        return cls(
            weight=weight,
            scales=torch.tensor(activation_scale, dtype=torch.float32) * row_scales,
            offsets=(weight.sum(dim=1, dtype=torch.int32) * zero_point).to(torch.int32),
            activation_scale=activation_scale,
            zero_point=zero_point,
        )

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mmgpt.int8_linear(
            x.contiguous(),
            self.weight,
            self.scales,
            self.offsets,
            bias,
            self.activation_scale,
            self.zero_point,
        )

    def arguments(self) -> list[torch.Tensor]:
        """The tensors a decode kernel takes for this matrix."""
        return [self.weight, self.scales, self.offsets]


@cache
def _reduce_range() -> bool:
    """Without VNNI, FBGEMM adds byte pairs into int16, which full 8-bit activations can
    overflow; 7 bits cannot. With VNNI it adds into int32, exactly."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return not ("avx512_vnni" in flags or "avx_vnni" in flags)


class PreparedProduct:
    """The model's float product, taking `PreparedWeight`s too."""

    def __init__(self, float_product: Product) -> None:
        self.float_product = float_product

    def __call__(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | PreparedWeight,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(weight, torch.Tensor):
            return self.float_product(x, weight, bias)
        return weight.linear(x, bias)

    def __repr__(self) -> str:
        return f"PreparedProduct({self.float_product!r})"
