"""Matrix products in the orientation the CPU runs fastest.

`x @ weight.T` and `(weight @ x.T).T` are the same numbers, but MKL picks different
kernels for them. Measured on the 2-core AVX-512 test machines (torch 2.13, fp32,
2 threads; BENCHMARKS.md has the table):

- One to eight rows, a weight that does not fit in cache (a decode step of a few
  sequences): `x @ weight.T` runs a GEMV or skinny GEMM on one core, reading the
  weight at about 12 GB/s; `weight @ x.T`, with x.T a transposed view, splits the
  weight over every thread. All of GPT-2 small's products for one token: 34 ms
  against 16 ms; for four rows 55 against 22 ms. One row is padded to two, because
  a single column still takes the one-core GEMV.
- Sixteen rows or more through the output layer: `weight @ x.T` is again faster
  (GPT-2 small, 32 rows: 33 ms against 51 ms), and the transposed result can stay
  a view because the sampler takes either layout.

bf16 goes through oneDNN, where the plain orientation is the faster one at every
row count, and small weights live in cache, where the extra copy costs more than it
saves; both keep `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT_MAJOR_MAX_ROWS = 8  # at 12 and 16 rows the two orientations trade places
WEIGHT_MAJOR_MIN_NUMEL = 1 << 18  # 1 MB of fp32: GPT-2 small's smallest weight is 2.25 MB
TRANSPOSED_LOGITS_MIN_ROWS = 16  # from here on the output layer is faster weight-major


def weight_major(rows: int, weight: torch.Tensor) -> bool:
    """Whether a product of `rows` rows with `weight` is faster taken as weight @ x.T."""
    return (
        rows <= WEIGHT_MAJOR_MAX_ROWS
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.numel() >= WEIGHT_MAJOR_MIN_NUMEL
    )


def _weight_major(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:  # [num_rows, out], contiguous
    num_rows = rows.shape[0]
    if num_rows == 1:
        rows = rows.repeat(2, 1)  # one column would take the single-threaded GEMV
    columns = rows.t()  # [in, rows] as a view of row-major rows: the layout MKL splits
    if bias is None:
        product = torch.mm(weight, columns)
    else:
        product = torch.addmm(bias.unsqueeze(1), weight, columns)  # [out, rows]
    return product[:, :num_rows].t().contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (x [..., in], weight [out, in]), taken weight-major where that is faster."""
    num_rows = x.numel() // x.shape[-1]
    if not weight_major(num_rows, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(num_rows, x.shape[-1]).contiguous()
    return _weight_major(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])


def logits(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """hidden [N, hidden] @ lm_head.T -> [N, vocab], possibly a transposed view."""
    if lm_head.device.type == "cpu" and hidden.shape[0] >= TRANSPOSED_LOGITS_MIN_ROWS:
        return torch.mm(lm_head, hidden.t()).t()
    return linear(hidden, lm_head)
