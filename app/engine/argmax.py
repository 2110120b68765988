"""Row-wise max and argmax over a vocabulary, fast on the CPU.

On the CPU `torch.argmax` and `torch.max(dim=...)` are not vectorised: over
[32, 50257] float32 logits they take 1.9 ms on one core, while `amax` (values
only) takes 0.1 ms. So the index is found in two passes: the maximum of every
block of `BLOCK` columns (amax), then argmax over the block maxima, then
argmax inside the one block per row that holds the row's maximum. Ties and NaN
resolve exactly as in `torch.argmax`: the first block whose maximum equals the
row's maximum holds the first position of that maximum, and NaN propagates
through amax as it wins in argmax.

The logits may be row-major [N, vocab] or a transposed view of a [vocab, N]
tensor (what the CPU output layer returns for large batches); each layout is
reduced along its contiguous dimension.
"""

from __future__ import annotations

import torch

BLOCK = 256  # columns per block: measured best among 128 / 256 / 512 at 1-64 rows
MIN_ROWS = 4  # below it the extra ops of the two passes cost more than they save


def max_and_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, vocab] -> (row maxima [N], first index of each maximum [N] int64)."""
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or vocab <= BLOCK or rows < MIN_ROWS:
        values, indices = logits.max(dim=-1)
        return values, indices
    transposed = logits.stride(-1) != 1 and logits.stride(0) == 1  # a [vocab, N] tensor's view
    return _two_pass(logits.t(), dim=0) if transposed else _two_pass(logits, dim=1)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The same as `logits.argmax(dim=-1)` for [N, vocab] logits."""
    return max_and_argmax(logits)[1]


def _two_pass(logits: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and first argmax along `dim`, the vocabulary's (and contiguous) dimension of a
    2-D tensor: [N, vocab] with dim 1, or [vocab, N] with dim 0."""
    vocab = logits.shape[dim]
    num_blocks = vocab // BLOCK
    whole = logits.narrow(dim, 0, num_blocks * BLOCK).unflatten(dim, (num_blocks, BLOCK))
    maxima = whole.amax(dim + 1)  # the block maxima: n in place of vocab along dim
    if num_blocks * BLOCK < vocab:  # the last, shorter block
        rest = logits.narrow(dim, num_blocks * BLOCK, vocab - num_blocks * BLOCK)
        maxima = torch.cat([maxima, rest.amax(dim, keepdim=True)], dim)
    first_block = maxima.argmax(dim, keepdim=True)  # 1 along dim
    shape = [-1 if d == dim else 1 for d in range(2)]
    offsets = torch.arange(BLOCK, device=logits.device).view(shape)  # BLOCK along dim
    positions = (first_block * BLOCK + offsets).clamp_(max=vocab - 1)
    within = logits.gather(dim, positions).argmax(dim, keepdim=True)
    return maxima.amax(dim), positions.gather(dim, within).squeeze(dim)
