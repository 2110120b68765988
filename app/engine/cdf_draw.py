"""Draws on the CPU: one uniform number per row finds its token in the running sum of
the row's weights (the inverse of its cumulative distribution).

top_p and min_p are applied by acceptance rather than as masks. As a mask, top_p needs
the probability of the least likely token in the nucleus, which for a flat row (a
random model's, or a trained one's where anything may come next) means sorting the
whole row: 17 ms for 32 rows of 50,257, where the draw itself takes 2. Instead a row
draws from its distribution as top_k left it and keeps the token only if it is in both
sets:
- in top_p's nucleus when the tokens strictly more likely than it hold less than top_p
  of the row's weight: one pass over the row (17 us at 50,257), with no sort;
- in min_p's set when its weight is at least min_p times the largest, which is 1.
A row whose token is not in them draws again. The tokens kept follow the distribution
truncated to both sets exactly: a draw accepted only inside a set is a draw from that
set, in proportion to its weights. The nucleus holds at least top_p of the weight, so
at top_p 0.9 at most one draw in ten is refused. A row still refused after MAX_ROUNDS
(a small top_p or a large min_p on a flat row) builds both sets as masks and draws
from them, which is a draw from the same truncated distribution.

top_k zeroes the weights below each row's k-th largest before any draw (`_keep_top_k`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from app.engine.topk import topk
from app.engine.truncation import column, exp_weights, nucleus_floor

MAX_ROUNDS = 4

# rows (indices into the batch) -> one uniform number in [0, 1) for each, float64
Uniforms = Callable[[list[int]], torch.Tensor]


def inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row from softmax(logits) [R, vocab], given uniforms [R] in [0, 1);
    `logits` become the running weights (a fresh multi-MB tensor costs its page faults).
    """
    return _search(exp_weights(logits, in_place=True).cumsum_(dim=-1), uniforms)


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
    running = weights.cumsum(dim=-1)  # [R, vocab]
    totals = running[:, -1].tolist()
    tokens = torch.empty(len(totals), dtype=torch.int64, device=logits.device)
    pending = list(range(len(totals)))
    for _ in range(MAX_ROUNDS):
        pending_running = running if len(pending) == len(totals) else running[pending]
        drawn = _search(pending_running, uniforms(pending)).tolist()
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

    Zeroed weights rather than -inf logits: exp(-inf) is 12 times slower than exp of a
    finite number on these CPUs (6 against 0.5 ms for 32 rows of 50,257), and a row cut
    to its top 50 is nearly all -inf.
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
    """Whether a token of this weight is in its row's min_p set and top_p nucleus."""
    if weight < min_p:
        return False
    if top_p >= 1.0:
        return True
    # threshold keeps what is strictly above `weight` and zeroes the rest, in one pass
    more_likely = F.threshold(weights, weight, 0.0).sum().item()
    return more_likely < top_p * total


def _draw_masked(
    weights: torch.Tensor,
    top_p: list[float],
    min_p: list[float],
    rows: list[int],
    uniforms: Uniforms,
) -> torch.Tensor:
    """Draws from `weights` [F, vocab] (of `rows`) with both sets built as masks."""
    device = weights.device
    probs = weights / weights.sum(dim=-1, keepdim=True)  # [F, vocab]
    p = column([top_p[row] for row in rows], device)  # [F, 1]
    floor = nucleus_floor(probs, p).masked_fill_(p >= 1.0, 0.0)  # top_p 1 keeps every token
    weights.masked_fill_(probs < floor, 0.0)
    least = column([min_p[row] for row in rows], device)  # [F, 1]
    weights.masked_fill_(weights < least, 0.0)
    return _search(weights.cumsum_(dim=-1), uniforms(rows))


def _search(running: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token [R] whose running weight [R, vocab] first passes u * total.

    A token of weight 0 (a masked one) never is, since the running sum does not grow
    there. The running sum is float32: each token's share comes out within one rounding
    of the total (6e-8 of it), far below what any number of draws could show.
    """
    total = running[:, -1:]  # [R, 1], at least 1
    below_total = torch.nextafter(total, torch.zeros_like(total))  # u * total may round up
    scaled = uniforms.to(device=running.device, dtype=running.dtype).unsqueeze(1) * total
    return torch.searchsorted(running, torch.minimum(scaled, below_total), right=True).squeeze(1)
