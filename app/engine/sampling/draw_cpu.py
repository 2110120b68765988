"""Draws on the CPU: one uniform number per row finds its token in the running sum of
the row's weights (the inverse of its cumulative distribution).

top_p and min_p accept or refuse the drawn token instead of masking the row: as a mask,
a flat row's nucleus needs the whole row sorted, many times the cost of the draw, while
testing one token is one pass over its row. A row draws from its distribution as top_k
left it (`_keep_top_k`) and keeps the token only if it is in both sets, as `truncation`
defines them, else draws again: a draw accepted only inside a set is a draw from that
set, in proportion to its weights. At top_p 0.9 at most one draw in ten is refused. A
row still refused after MAX_ROUNDS (a small top_p or a large min_p on a flat row) builds
both sets as masks and draws from them: the same truncated distribution.

The running sum is kept per SEARCH_BLOCK columns (`BlockedCdf`): a running sum over the
whole row is a sequential pass that writes as much as it reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from app.engine.sampling.kernels import SEARCH_BLOCK, exp_weights, topk
from app.engine.sampling.truncation import min_p_ratio, nucleus_floor, nucleus_limit

MAX_ROUNDS = 4

# rows (indices into the batch) -> one uniform number in [0, 1) for each, float64
Uniforms = Callable[[list[int]], torch.Tensor]


def inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row from softmax(logits) [R, vocab], given uniforms [R] in [0, 1);
    `logits` become the row's weights (a fresh multi-MB tensor costs its page faults).
    """
    return BlockedCdf(exp_weights(logits, in_place=True)).draw(None, uniforms)


def draw_truncated(
    logits: torch.Tensor,
    top_k: list[int],
    top_p: list[float],
    min_p: list[float],
    uniforms: Uniforms,
) -> torch.Tensor:
    """One draw per row [R] from softmax(logits) [R, vocab] cut down by each row's top_k,
    top_p and min_p (see `truncation`); `logits` become the row's weights."""
    vocab = logits.shape[1]
    cut_by_k = [row for row, k in enumerate(top_k) if k < vocab]
    if not cut_by_k and all(p >= 1.0 for p in top_p) and not any(min_p):
        return inverse_cdf(logits, uniforms(list(range(len(top_p)))))
    weights = exp_weights(logits, in_place=True)  # [R, vocab], each row's largest is 1
    if cut_by_k:
        _keep_top_k(weights, cut_by_k, top_k)
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
            if _accepts(weights[row], totals[row], weight, top_p[row], min_p[row]):
                tokens[row] = token
            else:
                refused.append(row)
        pending = refused
        if not pending:
            return tokens
    tokens[pending] = _draw_masked(weights[pending], top_p, min_p, pending, uniforms)
    return tokens


def _keep_top_k(weights: torch.Tensor, rows: list[int], top_k: list[int]) -> None:
    """Zero, in each of `rows`, every weight below its k-th largest (ties with it stay).

    Zeroed weights rather than -inf logits: exp(-inf) is far slower than exp of a finite
    number on these CPUs, and a row cut to its top 50 is nearly all -inf.
    """
    ks = [top_k[row] for row in rows]
    cut = weights if len(rows) == weights.shape[0] else weights[rows]  # [K, vocab]
    kth = topk(cut, max(ks))[0].gather(1, torch.tensor(ks).unsqueeze(1) - 1)  # [K, 1]
    # threshold keeps what is strictly above: just below the k-th keeps it and its ties
    below_kth = torch.nextafter(kth, torch.zeros_like(kth)).flatten().tolist()  # [K]
    for row, floor in zip(rows, below_kth, strict=True):
        F.threshold(weights[row], floor, 0.0, inplace=True)


def _accepts(
    weights: torch.Tensor, total: float, weight: float, top_p: float, min_p: float
) -> bool:
    """Whether a token of this weight is in its row's min_p set and top_p nucleus (the
    row's largest weight is 1)."""
    if weight < min_p_ratio(min_p):
        return False
    limit = nucleus_limit(top_p)
    if limit == math.inf:
        return True
    # threshold keeps what is strictly above `weight` and zeroes the rest, in one pass
    more_likely = F.threshold(weights, weight, 0.0).sum().item()
    return more_likely < limit * total


def _draw_masked(
    weights: torch.Tensor,
    top_p: list[float],
    min_p: list[float],
    rows: list[int],
    uniforms: Uniforms,
) -> torch.Tensor:
    """Draws from `weights` [F, vocab] (of `rows`) with both sets built as masks."""
    probs = weights / weights.sum(dim=-1, keepdim=True)  # [F, vocab]
    weights.masked_fill_(probs < nucleus_floor(probs, [top_p[row] for row in rows]), 0.0)
    ratio = torch.tensor([min_p_ratio(min_p[row]) for row in rows], device=weights.device)
    weights.masked_fill_(weights < ratio.unsqueeze(1), 0.0)  # the largest weight is 1
    return BlockedCdf(weights).draw(None, uniforms(rows))


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
