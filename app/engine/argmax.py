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
    if logits.stride(-1) != 1 and logits.stride(0) == 1:  # a transposed [vocab, N] tensor
        return _columns(logits.t())
    return _rows(logits)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The same as `logits.argmax(dim=-1)` for [N, vocab] logits."""
    return max_and_argmax(logits)[1]


def _rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and first argmax of each row of rows [N, vocab]."""
    vocab = rows.shape[1]
    num_blocks = vocab // BLOCK
    maxima = rows[:, : num_blocks * BLOCK].unflatten(1, (num_blocks, BLOCK)).amax(2)  # [N, n]
    if num_blocks * BLOCK < vocab:  # the last, shorter block
        maxima = torch.cat([maxima, rows[:, num_blocks * BLOCK :].amax(1, keepdim=True)], 1)
    first_block = maxima.argmax(1, keepdim=True)  # [N, 1]
    offsets = torch.arange(BLOCK, device=rows.device)  # [BLOCK]
    positions = (first_block * BLOCK + offsets).clamp_(max=vocab - 1)  # [N, BLOCK]
    within = rows.gather(1, positions).argmax(1, keepdim=True)  # [N, 1]
    return maxima.amax(1), positions.gather(1, within).squeeze(1)


def _columns(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and first argmax of each column of columns [vocab, N]: `_rows` transposed."""
    vocab = columns.shape[0]
    num_blocks = vocab // BLOCK
    maxima = columns[: num_blocks * BLOCK].unflatten(0, (num_blocks, BLOCK)).amax(1)  # [n, N]
    if num_blocks * BLOCK < vocab:
        maxima = torch.cat([maxima, columns[num_blocks * BLOCK :].amax(0, keepdim=True)])
    first_block = maxima.argmax(0, keepdim=True)  # [1, N]
    offsets = torch.arange(BLOCK, device=columns.device).unsqueeze(1)  # [BLOCK, 1]
    positions = (first_block * BLOCK + offsets).clamp_(max=vocab - 1)  # [BLOCK, N]
    within = columns.gather(0, positions).argmax(0, keepdim=True)  # [1, N]
    return maxima.amax(0), positions.gather(0, within).squeeze(0)
