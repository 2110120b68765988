"""Draws on the CPU: one uniform number per row finds its token in the running sum of
the row's weights (the inverse of its cumulative distribution).

top_p and min_p accept or refuse the drawn token instead of masking the row: as a mask,
a flat row's nucleus needs the whole row sorted, many times the cost of the draw, while
testing one token is one pass over its row. A row draws from its distribution as top_k
left it and keeps the token only if it is in both sets (`Truncation.accepts`), else
draws again: a draw accepted only inside a set is a draw from that set, in proportion to
its weights. At top_p 0.9 at most one draw in ten is refused. A row still refused after
MAX_ROUNDS (a small top_p or a large min_p on a flat row) draws from both sets built as
masks: the same truncated distribution.

The running sum is kept per SEARCH_BLOCK columns (`BlockedCdf`): a running sum over the
whole row is a sequential pass that writes as much as it reads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from app.engine.sampling.kernels import SEARCH_BLOCK, exp_weights
from app.engine.sampling.truncation import Truncation

MAX_ROUNDS = 4

# rows (indices into the batch) -> one uniform number in [0, 1) for each, float64
Uniforms = Callable[[list[int]], torch.Tensor]


def inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row from softmax(logits) [R, vocab], given uniforms [R] in [0, 1);
    `logits` become the row's weights (a fresh multi-MB tensor costs its page faults).
    """
    return BlockedCdf(exp_weights(logits, in_place=True)).draw(None, uniforms)


def draw_truncated(logits: torch.Tensor, truncation: Truncation, uniforms: Uniforms) -> Tensor:
    """One draw per row [R] from softmax(logits) [R, vocab] cut down by each row's top_k,
    top_p and min_p; `logits` become the row's weights."""
    if truncation.keeps_every_token(logits.shape[1]):
        return inverse_cdf(logits, uniforms(list(range(logits.shape[0]))))
    weights = exp_weights(logits, in_place=True)  # [R, vocab], each row's largest is 1
    truncation.zero_below_top_k(weights)
    cdf = BlockedCdf(weights)
    totals = cdf.totals()
    tokens = torch.empty(len(totals), dtype=torch.int64, device=logits.device)
    pending = list(range(len(totals)))
    for _ in range(MAX_ROUNDS):
        rows = None if len(pending) == len(totals) else pending
        drawn = cdf.draw(rows, uniforms(pending)).tolist()
        drawn_weights = weights[pending, drawn].tolist()
        refused = []
        for row, token, weight in zip(pending, drawn, drawn_weights, strict=True):
            if truncation.accepts(row, weights[row], totals[row], weight):
                tokens[row] = token
            else:
                refused.append(row)
        pending = refused
        if not pending:
            return tokens
    left = weights[pending]  # [F, vocab]: rows refused MAX_ROUNDS times draw from masks
    truncation.of_rows(pending).zero_outside_sets(left)
    tokens[pending] = BlockedCdf(left).draw(None, uniforms(pending))
    return tokens


class BlockedCdf:
    """The running sum of each row's weights [R, vocab] (each at least 0, and each row's
    total positive), kept per SEARCH_BLOCK columns; `draw` finds a draw's token in it.
    """

    def __init__(self, weights: Tensor) -> None:
        self.weights = weights
        rows, vocab = weights.shape
        whole = vocab - vocab % SEARCH_BLOCK
        sums = weights[:, :whole].reshape(rows, -1, SEARCH_BLOCK).sum(dim=-1)  # [R, blocks]
        if whole < vocab:
            sums = torch.cat([sums, weights[:, whole:].sum(dim=-1, keepdim=True)], dim=1)
        self.running = sums.cumsum_(dim=-1)  # [R, blocks]

    def totals(self) -> list[float]:
        return self.running[:, -1].tolist()

    def draw(self, rows: list[int] | None, uniforms: Tensor) -> Tensor:
        """The token [P] of each of `rows` (None: every row) whose running weight first
        passes u * total, for uniforms [P] in [0, 1).

        A token of weight 0 (a masked one) never is, since the running sum does not grow
        there: the block found holds some weight, and the search within it stops short of
        the block's own total. The sums are float32: each token's share comes out within a
        few roundings of the total (6e-8 of it each), far below what any number of draws
        could show.
        """
        weights, device = self.weights, self.weights.device
        vocab = weights.shape[1]
        running = self.running if rows is None else self.running[rows]  # [P, blocks]
        total = running[:, -1:]  # [P, 1]
        scaled = uniforms.to(device=device, dtype=running.dtype).unsqueeze(1) * total
        target = _under(total, scaled)  # [P, 1]
        block = torch.searchsorted(running, target, right=True)  # [P, 1]
        before = running.gather(1, (block - 1).clamp_min(0)).masked_fill_(block == 0, 0.0)
        offsets = torch.arange(SEARCH_BLOCK, device=device)
        columns = block * SEARCH_BLOCK + offsets  # [P, SEARCH_BLOCK]
        if rows is None:
            row_index = torch.arange(weights.shape[0], device=device).unsqueeze(1)  # [P, 1]
        else:
            row_index = torch.tensor(rows, device=device).unsqueeze(1)
        inside = weights[row_index, columns.clamp_max(vocab - 1)]  # [P, SEARCH_BLOCK]
        inside = inside.masked_fill_(columns >= vocab, 0.0).cumsum_(dim=-1)
        # the block's own running sum may end a rounding short of its step in `running`
        offset = _under(inside[:, -1:], target - before)
        return (columns[:, :1] + torch.searchsorted(inside, offset, right=True)).squeeze(1)


def _under(limit: Tensor, value: Tensor) -> Tensor:
    """value [P, 1] capped just below limit [P, 1] (u * total may round up to total)."""
    return torch.minimum(value, torch.nextafter(limit, torch.zeros_like(limit)))
