"""Row-wise kernels over [rows, vocab] logits, fast on the CPU: argmax, top k, softmax weights.

On the CPU `torch.argmax`, `torch.max(dim=...)` and `torch.topk` are not vectorised and
`amax` is, an order of magnitude faster: so argmax and top k first reduce blocks of
columns with `amax`, then look only inside the blocks that hold the answer. The timings
behind each choice are in BENCHMARKS.md's history.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Columns per block of a two-pass search along a row: a reduction of every block, then a
# look inside the one block that holds the answer (argmax; the CPU draw's running sum).
SEARCH_BLOCK = 256
FAST_WIDTH = 32  # see _column_block_maxima
NUMPY_MAX_ROWS = 32  # row-major logits up to this many rows go to numpy
MIN_ROWS = 4  # dtypes numpy lacks: below it the extra ops of two passes cost more than they save
NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)  # numpy has no bfloat16
TOPK_BLOCK = 64  # smaller than SEARCH_BLOCK: the block top k reads k blocks, not one
MIN_BLOCKS_PER_K = 8  # fewer blocks than this per k, and the first pass saves too little
WEIGHT_FLOOR = -87.0  # exp() of less is a float32 denormal (under 1.18e-38)


def max_and_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, vocab] -> (row maxima [N], first index of each maximum [N] int64).

    Row-major logits up to NUMPY_MAX_ROWS rows go to numpy's argmax, which is vectorised
    and needs no extra torch ops (each costs microseconds at these sizes); more rows, and
    a transposed view of a [vocab, N] tensor (what the output layer returns for large
    batches), take two passes along their contiguous dimension. Ties and NaN resolve as
    in `torch.argmax` either way: numpy returns the first maximum and the first NaN.
    """
    rows, vocab = logits.shape
    transposed = logits.stride(-1) != 1 and logits.stride(0) == 1  # a [vocab, N] tensor's view
    if logits.device.type != "cpu":
        return _torch(logits)
    if logits.dtype in NUMPY_DTYPES and not transposed and rows <= NUMPY_MAX_ROWS:
        return _numpy(logits)
    if vocab <= SEARCH_BLOCK or rows < MIN_ROWS:
        return _numpy(logits) if logits.dtype in NUMPY_DTYPES else _torch(logits)
    return _two_pass(logits.t(), dim=0) if transposed else _two_pass(logits, dim=1)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The same as `logits.argmax(dim=-1)` for [N, vocab] logits."""
    return max_and_argmax(logits)[1]


def _torch(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = logits.max(dim=-1)
    return values, indices


def _numpy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    array = logits.numpy()  # a view, no copy
    indices = array.argmax(axis=1)  # [N] int64
    values = array[np.arange(array.shape[0]), indices]  # [N]
    return torch.from_numpy(values), torch.from_numpy(indices)


def _two_pass(logits: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and first argmax along `dim`, the vocabulary's dimension of a contiguous 2-D
    tensor: [N, vocab] with dim 1, or [vocab, N] with dim 0.

    The maximum of every SEARCH_BLOCK columns, then argmax inside the first block whose
    maximum is the row's: it holds the maximum's first position, and NaN propagates
    through amax as it wins in argmax.
    """
    vocab = logits.shape[dim]
    num_blocks = vocab // SEARCH_BLOCK
    whole = logits.narrow(dim, 0, num_blocks * SEARCH_BLOCK).unflatten(
        dim, (num_blocks, SEARCH_BLOCK)
    )
    maxima = whole.amax(2) if dim == 1 else _column_block_maxima(whole)  # n along dim
    if num_blocks * SEARCH_BLOCK < vocab:  # the last, shorter block
        rest = logits.narrow(dim, num_blocks * SEARCH_BLOCK, vocab - num_blocks * SEARCH_BLOCK)
        maxima = torch.cat([maxima, rest.amax(dim, keepdim=True)], dim)
    first_block = maxima.argmax(dim, keepdim=True)  # 1 along dim
    shape = [-1 if d == dim else 1 for d in range(2)]
    offsets = torch.arange(SEARCH_BLOCK, device=logits.device).view(shape)  # SEARCH_BLOCK along dim
    positions = (first_block * SEARCH_BLOCK + offsets).clamp_(max=vocab - 1)
    within = logits.gather(dim, positions).argmax(dim, keepdim=True)
    return maxima.amax(dim), positions.gather(dim, within).squeeze(dim)


def _column_block_maxima(blocks: torch.Tensor) -> torch.Tensor:
    """[num_blocks, SEARCH_BLOCK, N] -> the maximum of each block's columns [num_blocks, N].

    Torch vectorises this reduction only when the contiguous width is a multiple of
    FAST_WIDTH (other widths are an order of magnitude slower). So `fold` consecutive
    rows are viewed as one row of fold * N columns, reduced, and the fold partial maxima
    of each column are then reduced in a second, small op.
    """
    num_blocks, block, width = blocks.shape
    fold = FAST_WIDTH // math.gcd(width, FAST_WIDTH)  # divides SEARCH_BLOCK: both are powers of 2
    if fold == 1:
        return blocks.amax(1)
    # a view for the output layer's own result; a copy for a view of only some of its rows
    folded = blocks.reshape(num_blocks, block // fold, fold * width).amax(1)
    return folded.view(num_blocks, fold, width).amax(1)


def topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of `values` [R, vocab], largest first, and their
    indices: ([R, k], [R, k] int64), as `values.topk(k, dim=-1)`.

    On the CPU `torch.topk` reads only the k blocks of TOPK_BLOCK columns with the largest
    maxima, and the last, shorter block: a value in any other block has k blocks whose
    maxima, k other values, are at least as large. Values come out as `torch.topk`'s;
    among equal values the indices may be other ones.
    """
    rows, vocab = values.shape
    num_blocks = vocab // TOPK_BLOCK
    if values.device.type != "cpu" or not 0 < k * MIN_BLOCKS_PER_K <= num_blocks:
        return _torch_topk(values, k)
    whole = values[:, : num_blocks * TOPK_BLOCK]  # a view of the whole blocks
    maxima = whole.unflatten(1, (num_blocks, TOPK_BLOCK)).amax(2)  # [R, num_blocks]
    blocks = maxima.topk(k, dim=1).indices  # [R, k]
    offsets = torch.arange(TOPK_BLOCK, device=values.device)
    positions = (blocks.unsqueeze(2) * TOPK_BLOCK + offsets).flatten(1)  # [R, k * TOPK_BLOCK]
    candidates = whole.gather(1, positions)
    tail = vocab - num_blocks * TOPK_BLOCK
    if tail:  # the last, shorter block: always a candidate
        tail_positions = torch.arange(num_blocks * TOPK_BLOCK, vocab, device=values.device)
        positions = torch.cat([positions, tail_positions.expand(rows, tail)], dim=1)
        candidates = torch.cat([candidates, values[:, num_blocks * TOPK_BLOCK :]], dim=1)
    top, at = candidates.topk(k, dim=1)
    return top, positions.gather(1, at)


def _torch_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top, indices = values.topk(k, dim=-1)
    return top, indices


def exp_weights(logits: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """exp(logit - row max) [R, vocab], in [0, 1], each row's largest exactly 1; 0 where
    logit - row max <= WEIGHT_FLOOR.

    Below that float32 turns denormal, and on x86 denormal arithmetic is far slower: low
    temperatures spread logits far enough to make a quarter of a row denormal. The
    tokens dropped hold under 1e-38 of their row's largest weight each.
    """
    row_max = logits.amax(dim=-1, keepdim=True)
    # at most 0; `sub(out=logits)` would go through a temporary and a copy
    shifted = logits.sub_(row_max) if in_place else logits - row_max
    # -inf there, whose exp is an exact 0: two passes over the row where a mask, a clamp and
    # a fill took four. exp(-inf) is far slower than a finite exp on these CPUs, which costs
    # nothing for a few masked tokens; rows mostly masked zero weights instead
    # (`Truncation.zero_below_top_k`)
    return F.threshold(shifted, WEIGHT_FLOOR, float("-inf"), inplace=True).exp_()


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits) [R, vocab] without denormals (see `exp_weights`)."""
    weights = exp_weights(logits)
    return weights.div_(weights.sum(dim=-1, keepdim=True))


def column(values: list[float], device: torch.device) -> torch.Tensor:
    """Per-row float parameters as a [R, 1] float32 column, to broadcast over [R, vocab]."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)
