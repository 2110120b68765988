"""top_k, top_p and min_p: the one definition of each set, in every form a sampling path
applies it.

top_k keeps the k most likely tokens and every token that ties the k-th; top_p then
keeps the smallest set of most likely tokens whose probability (within what top_k left)
reaches top_p, and any token exactly as likely as the least likely one in it (a sort
orders ties arbitrarily, so ties are all kept or all dropped); min_p then keeps the
tokens at least min_p times as likely as the most likely one. `nucleus_limit` and
`min_p_ratio` decide membership of both sets, for the masks over logits (a GPU's draws)
and for the CPU's accept/refuse draws alike (`Truncation`).

top_p's cut is a probability floor, so no token order needs to be kept: it is looked
for among the TOP_P_CANDIDATES most likely tokens first, and only rows whose nucleus
goes past them are sorted whole (by numpy on the CPU, far faster there than torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from app.engine.sampling.kernels import column, probabilities, topk
from app.engine.sequence import Sequence

# top_p's first look: a trained model's nucleus at the usual top_p rarely holds more
TOP_P_CANDIDATES = 256
# A boundary that falls on a sum of probabilities (top_p 0.7 over 0.3 + 0.22 + 0.18, or
# min_p 0.4 of 0.3 against 0.12) would be decided by rounding, and rounding follows the
# CPU's summation order. Both rules compare with this margin (a share of the row's total
# weight), far above float32's error in these sums, so that such a tie falls on the side
# the definition puts it, on every host and on every sampling path.
BOUNDARY_MARGIN = 1e-4


def nucleus_limit(top_p: float) -> float:
    """A token is in top_p's nucleus when the tokens more likely than it hold less than
    this share of the row: exactly top_p is out (the smallest set reaching top_p ends
    before it), and top_p 1 keeps every token."""
    return top_p - BOUNDARY_MARGIN if top_p < 1.0 else math.inf


def min_p_ratio(min_p: float) -> float:
    """A token is in min_p's set when its probability is at least this times the row's
    largest: exactly min_p is in."""
    return max(min_p - BOUNDARY_MARGIN, 0.0)


@dataclass(frozen=True)
class Truncation:
    """Each row's top_k (vocab where it keeps every token), top_p and min_p, applied in the
    form a sampling path needs: masks over logits (`mask_logits`), or, for the CPU's
    draws, weights zeroed below top_k (`zero_below_top_k`), a test of one drawn token
    (`accepts`) and weights zeroed outside the top_p and min_p sets (`zero_outside_sets`).
    """

    top_k: list[int]
    top_p: list[float]
    min_p: list[float]

    @classmethod
    def of(cls, seqs: list[Sequence], vocab: int) -> Truncation:
        top_k = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in seqs]
        return cls(top_k, [s.params.top_p for s in seqs], [s.params.min_p for s in seqs])

    def of_rows(self, rows: list[int]) -> Truncation:
        return Truncation(
            [self.top_k[row] for row in rows],
            [self.top_p[row] for row in rows],
            [self.min_p[row] for row in rows],
        )

    def keeps_every_token(self, vocab: int) -> bool:
        return (
            all(k >= vocab for k in self.top_k)
            and all(p >= 1.0 for p in self.top_p)
            and not any(self.min_p)
        )

    def mask_logits(self, logits: torch.Tensor) -> None:
        """top_k, then top_p, then min_p, in place, on rows that ask for them."""
        vocab = logits.shape[1]
        if any(p < 1.0 for p in self.top_p):
            mask_top_k_top_p(logits, self.top_k, self.top_p)
        elif any(k < vocab for k in self.top_k):
            mask_top_k(logits, self.top_k)
        if any(p > 0.0 for p in self.min_p):
            mask_min_p(logits, self.min_p)

    def zero_below_top_k(self, weights: torch.Tensor) -> None:
        """Zero, in each row top_k cuts, every weight [R, vocab] below its k-th largest
        (ties with it stay).

        Zeroed weights rather than -inf logits: exp(-inf) is far slower than exp of a
        finite number on these CPUs, and a row cut to its top 50 is nearly all -inf.
        """
        rows = [row for row, k in enumerate(self.top_k) if k < weights.shape[1]]
        if not rows:
            return
        ks = [self.top_k[row] for row in rows]
        cut = weights if len(rows) == weights.shape[0] else weights[rows]  # [K, vocab]
        kth = topk(cut, max(ks))[0].gather(1, torch.tensor(ks).unsqueeze(1) - 1)  # [K, 1]
        # threshold keeps what is strictly above: just below the k-th keeps it and its ties
        below_kth = torch.nextafter(kth, torch.zeros_like(kth)).flatten().tolist()  # [K]
        for row, floor in zip(rows, below_kth, strict=True):
            F.threshold(weights[row], floor, 0.0, inplace=True)

    def accepts(self, row: int, weights: torch.Tensor, total: float, weight: float) -> bool:
        """Whether a token of this weight is in row `row`'s min_p set and top_p nucleus,
        given the row's weights [vocab] (its largest is 1) and their total."""
        if weight < min_p_ratio(self.min_p[row]):
            return False
        limit = nucleus_limit(self.top_p[row])
        if limit == math.inf:
            return True
        # threshold keeps what is strictly above `weight` and zeroes the rest, in one pass
        more_likely = F.threshold(weights, weight, 0.0).sum().item()
        return more_likely < limit * total

    def zero_outside_sets(self, weights: torch.Tensor) -> None:
        """Zero the weights [R, vocab] (each row's largest is 1) outside each row's top_p
        nucleus and min_p set."""
        probs = weights / weights.sum(dim=-1, keepdim=True)  # [R, vocab]
        weights.masked_fill_(probs < nucleus_floor(probs, self.top_p), 0.0)
        ratio = torch.tensor([min_p_ratio(m) for m in self.min_p], device=weights.device)
        weights.masked_fill_(weights < ratio.unsqueeze(1), 0.0)  # [R, vocab]


def mask_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    """Keep, per row, every token whose logit is at least the row's k-th largest."""
    k = torch.tensor(top_k, device=logits.device).unsqueeze(1)  # [R, 1]
    top_values = logits.topk(max(top_k), dim=-1).values  # [R, max_k]
    threshold = top_values.gather(1, k - 1)  # [R, 1]
    logits.masked_fill_(logits < threshold, float("-inf"))


def mask_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    """top_k as in `mask_top_k`, then keep the smallest most-likely set reaching top_p,
    and any token exactly as likely as the least likely one in it."""
    if any(k < logits.shape[1] for k in top_k):
        mask_top_k(logits, top_k)
    probs = probabilities(logits)  # [R, vocab]
    logits.masked_fill_(probs < nucleus_floor(probs, top_p), float("-inf"))


def nucleus_floor(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """[R, 1]: the probability of the least likely token in each row's nucleus (0 for
    rows whose top_p keeps every token)."""
    limit = column([nucleus_limit(p) for p in top_p], probs.device)  # [R, 1]
    candidates = min(TOP_P_CANDIDATES, probs.shape[1])
    top = probs.topk(candidates, dim=-1).values  # [R, candidates], most likely first
    mass_before = top.cumsum(dim=-1) - top  # exclusive
    size = (mass_before < limit).sum(dim=-1, keepdim=True).clamp_(min=1)  # the first stays
    floor = top.gather(1, size - 1)
    cut = limit.squeeze(1) < math.inf
    wider = ((size.squeeze(1) == candidates) & cut).nonzero().flatten().tolist()
    if candidates < probs.shape[1] and wider:  # the nucleus goes on past the candidates
        floor[wider] = _floor_by_sorting(probs[wider], limit[wider])
    return floor.masked_fill_(~cut.unsqueeze(1), 0.0)


def _floor_by_sorting(probs: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """The nucleus floor [W, 1] of every token sorted. Ascending, token j is in the nucleus
    when the mass above it, total - cumsum[j], is less than the limit: a binary search in
    the cumulative sum."""
    if probs.device.type == "cpu":
        ascending = torch.from_numpy(np.sort(probs.numpy(), axis=-1))
    else:
        ascending = probs.sort(dim=-1).values
    running = ascending.cumsum(dim=-1)  # [W, vocab]
    above_limit = running[:, -1:] - limit  # the nucleus: running sum past this
    first = torch.searchsorted(running, above_limit, right=True)  # [W, 1]
    return ascending.gather(1, first.clamp_(max=ascending.shape[1] - 1))


def mask_min_p(logits: torch.Tensor, min_p: list[float]) -> None:
    """Keep the tokens whose probability is at least min_p times the row's largest."""
    probs = probabilities(logits)  # [R, vocab]
    ratio = column([min_p_ratio(m) for m in min_p], logits.device)  # [R, 1]
    logits.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * ratio, float("-inf"))
