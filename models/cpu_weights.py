"""Decoder matrices in a CPU library's own layout, prepared once when a model loads.

- `PackedWeight` (float32): oneDNN's blocked layout, the op torch.compile's CPU backend
  emits for a frozen linear layer. MKL's plain GEMM splits a few-row product poorly over
  two cores; the packed one runs the same numbers at every row count (BENCHMARKS.md).
- `FbgemmInt8Weight`: FBGEMM's packed int8 with one scale per output row. Each product
  quantises its activations to 8 bits dynamically, multiplies in integers, and scales back.
  Every row is scaled to a largest magnitude of 1 first, and a fixed row holding -1 and 1
  rides along, so the one range FBGEMM derives from the whole tensor is [-1, 1] whatever
  the batch: a row's result depends on that row alone, as it does in float.

A layer's product (`PreparedProduct`) hands these to their own `linear` and every other
weight to the model's float product.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import torch

from models.linear import PreparedWeight, Product

# The batch size oneDNN lays a packed weight out for: one layout serves every row count,
# and this one measured as fast as any at one row and the fastest at 8 to 64.
PACKING_ROWS = 32


class PackedWeight:
    """A float32 weight reordered into oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.shape = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKING_ROWS)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    @staticmethod
    def available() -> bool:
        return torch.backends.mkldnn.is_available()


class FbgemmInt8Weight:
    """int8 weights [out, in] in FBGEMM's layout, each row rounded to its own scale."""

    def __init__(self, weight: torch.Tensor) -> None:
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
        # NOTE: shared by every call, so one thread at a time (the engine's) runs them
        self._rows = torch.empty(0)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        peaks = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1, keepdim=True)
        peaks.clamp_(min=1e-30)  # an all-zero row stays zero
        scaled = self._scaled_rows(len(rows))
        torch.div(rows, peaks, out=scaled[1:])
        product = torch.ops.quantized.linear_dynamic(scaled, self.packed, _reduce_range())
        out = product[1:].mul_(peaks)
        if bias is not None:
            out += bias
        return out.to(x.dtype).view(*x.shape[:-1], self.shape[0])

    def _scaled_rows(self, num_rows: int) -> torch.Tensor:
        """A kept buffer [num_rows + 1, in] whose first row is the fixed [-1, 1] one."""
        if len(self._rows) <= num_rows:
            with torch.inference_mode(False):  # writable inside inference mode and out
                self._rows = torch.zeros(max(num_rows + 1, 2 * len(self._rows)), self.shape[1])
            self._rows[0, 0], self._rows[0, 1] = -1.0, 1.0
        return self._rows[: num_rows + 1]

    @staticmethod
    def available() -> bool:
        return "fbgemm" in torch.backends.quantized.supported_engines


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
