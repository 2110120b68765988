"""Matrix products in the orientation the CPU runs fastest.

`x @ weight.T` and `(weight @ x.T).T` are the same numbers, but MKL picks different
kernels for them. Measured on the 2-core AVX-512 test machines (torch 2.13, fp32,
2 threads; BENCHMARKS.md has the table):

- One to eight rows (a decode step of a few sequences) of a model whose weights do
  not fit in cache: `x @ weight.T` runs a GEMV or skinny GEMM on one core, reading
  the weight at about 12 GB/s; `weight @ x.T`, with x.T a transposed view, splits
  the weight over every thread. All of GPT-2 small's products for one token: 34 ms
  against 16 ms; for four rows 55 against 22 ms. One row is padded to two, because
  a single column still takes the one-core GEMV. When the weights stay in cache
  the GEMV is the faster one (the tiny test model's [50257, 64] output layer:
  0.29 against 0.89 ms), so the choice is made once per model, from its size
  (`decode_product`).
- Sixteen rows or more through the output layer: `weight @ x.T` is again faster
  (GPT-2 small, 32 rows: 33 ms against 51 ms), and the transposed result can stay
  a view because the sampler takes either layout.

bf16 goes through oneDNN, where the plain orientation is the faster one at every
row count: it keeps `F.linear`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

WEIGHT_MAJOR_MAX_ROWS = 8  # at 12 and 16 rows the two orientations trade places
# The test machines' L3 is 32 MiB: a model under it decodes from cache.
STREAMED_WEIGHT_BYTES = 32 << 20
TRANSPOSED_LOGITS_MIN_ROWS = 16  # from here on the output layer is faster weight-major

# x [..., in], weight [out, in], bias [out] or None -> x @ weight.T + bias
Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def decode_product(weights: Iterable[torch.Tensor]) -> Product:
    """The product a model's layers use: `linear` for fp32 weights on the CPU that stream
    from memory at every decode step, F.linear otherwise."""
    weights = list(weights)
    streamed = sum(w.numel() * w.element_size() for w in weights) >= STREAMED_WEIGHT_BYTES
    fp32_cpu = all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights)
    return linear if streamed and fp32_cpu else F.linear


def weight_major(rows: int, weight: torch.Tensor) -> bool:
    """Whether a product of `rows` rows with `weight` is faster taken as weight @ x.T."""
    return (
        rows <= WEIGHT_MAJOR_MAX_ROWS
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
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


def logits(hidden: torch.Tensor, lm_head: torch.Tensor, product: Product) -> torch.Tensor:
    """hidden [N, hidden] @ lm_head.T -> [N, vocab], possibly a transposed view."""
    if lm_head.device.type == "cpu" and hidden.shape[0] >= TRANSPOSED_LOGITS_MIN_ROWS:
        return torch.mm(lm_head, hidden.t()).t()
    return product(hidden, lm_head, None)
