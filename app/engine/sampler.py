"""Vectorised sampling over one step's rows, each with its own parameters and seed.

The order of processing, per row:
1. repetition penalty (over prompt and output tokens: positive logits divided,
   negative ones multiplied), then frequency and presence penalties (over
   output tokens: `logit -= frequency * count + presence * (count > 0)`);
2. while fewer than `min_tokens` are generated, EOS and stop token ids are masked;
3. greedy rows (temperature below GREEDY_TEMPERATURE) take the argmax here;
4. the others divide by their temperature, then keep the top_k tokens (every
   token whose logit ties the k-th largest stays), then the smallest set of
   most likely tokens whose probability reaches top_p, then the tokens whose
   probability is at least min_p times the largest, and draw one token.

Logprobs are the log-softmax of the logits after steps 1-2 and the temperature
(temperature 1 for greedy rows), before top_k / top_p / min_p truncation, so
every alternative has a finite value. This is vLLM's "processed logprobs"
minus the truncation.

Banned tokens (a multimodal model's image placeholder, which only images may
fill) are never sampled.

Draws on a GPU are the exponential race (argmax of probs / Exp(1) noise). It needs
a random number for every token, which on the CPU cost 31 ms for 32 rows of 50,257
(19 ns each): ten times the tiny test model's whole step. So on the CPU draws invert
the cumulative distribution instead: one uniform number per row, scaled by the row's
total weight, finds its token in the running sum of exp(logit - max). The race stays
on the GPU, where noise is cheap, because it is the steadier of the two: a bf16 GEMM
there rounds differently for each batch shape, which moves a race's winner only on a
near tie but a cumulative draw by the sum of every earlier token's rounding. (On the
CPU a row's logits come out the same in any batch: `bench.gpu_check --device cpu`.)
A seeded row draws its numbers from its own generator, so its tokens depend only on
its own logits and seed, not on its batch-mates.

top_p looks for its cut among the TOP_P_CANDIDATES most likely tokens first, and
sorts the whole row only where they hold less than top_p of the probability (2.7 ms
for 32 rows of 50,257 against 4.9 ms for numpy's sort of the values, and 51 ms for
torch's sort, which the CPU used to take). The cut is a probability floor, so no
token order needs to be kept.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch
import torch.nn.functional as F

from app.engine.argmax import argmax, max_and_argmax
from app.engine.sequence import Sequence

POSINF_REPLACEMENT = 1e30  # +inf logits become this, so that softmax stays defined
# top_p's first look: a trained model's nucleus at the usual top_p rarely holds more
TOP_P_CANDIDATES = 256
WEIGHT_FLOOR = -87.0  # exp() of less is a float32 denormal (under 1.18e-38)


@dataclass
class RowLogprobs:
    """Logprobs of one sampled token and of the top alternatives in its row."""

    token_logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[RowLogprobs | None]  # one per row; None where not asked for
    nonfinite_rows: list[int]  # rows whose logits had no finite value (sampled from uniform)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed`."""
    return (seed + index * 0x9E3779B97F4A7C15) % (1 << 64)


class Sampler:
    def __init__(
        self,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        seed: int = 0,
        banned_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.banned_token_ids = list(banned_token_ids)  # never sampled (image placeholders)
        self.generator = torch.Generator(device=device).manual_seed(seed)  # unseeded rows
        self.draws_by_race = device.type != "cpu"  # see the module's docstring

    @staticmethod
    def wants_row_major(seqs: Seq[Sequence]) -> bool:
        """Whether the logits of these rows should come as contiguous rows: every path but
        plain greedy works row by row, and the output layer makes rows cheaper than a copy
        of its transposed result."""
        return not _all_plain_greedy(seqs)

    def sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SamplerOutput:
        """logits: [N, vocab] float32, row i for `seqs[i]`. May modify logits in place."""
        if self.banned_token_ids:
            logits[:, self.banned_token_ids] = float("-inf")
        if _all_plain_greedy(seqs):
            row_max, token_ids = max_and_argmax(logits)  # [N], [N]
            if _all_finite(row_max):
                return SamplerOutput(token_ids.tolist(), [None] * len(seqs), [])
        logits, nonfinite = _sanitise(logits.contiguous())  # the rest works row by row
        if nonfinite and self.banned_token_ids:  # rows reset to uniform lost their bans
            logits[:, self.banned_token_ids] = float("-inf")
        self._apply_logit_processors(logits, seqs)
        greedy = [seq.is_greedy for seq in seqs]
        wants_logprobs = any(seq.params.logprobs is not None for seq in seqs)
        if all(greedy) and not wants_logprobs:
            return SamplerOutput(argmax(logits).tolist(), [None] * len(seqs), nonfinite)
        scaled = _scale_by_temperature(logits, seqs, greedy)  # [N, vocab]
        token_ids = self._draw(scaled, seqs, greedy)  # [N]
        row_logprobs = _gather_logprobs(scaled, token_ids, seqs) if wants_logprobs else None
        return SamplerOutput(token_ids.tolist(), row_logprobs or [None] * len(seqs), nonfinite)

    def _apply_logit_processors(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
        penalised = [i for i, seq in enumerate(seqs) if seq.has_penalties]
        if penalised:
            apply_penalties(logits, [seqs[i] for i in penalised], penalised)
        below_min = [
            i for i, seq in enumerate(seqs) if seq.num_output_tokens < seq.params.min_tokens
        ]
        for i in below_min:
            banned = list(seqs[i].params.stop_token_ids)
            if not seqs[i].params.ignore_eos:
                banned += self.eos_token_ids
            logits[i, banned] = float("-inf")

    def _draw(self, scaled: torch.Tensor, seqs: Seq[Sequence], greedy: list[bool]) -> torch.Tensor:
        """One token per row: argmax for greedy rows, a truncated categorical draw for others."""
        rows = [i for i, is_greedy in enumerate(greedy) if not is_greedy]
        if len(rows) < len(seqs):
            token_ids = argmax(scaled)  # [N]
        else:
            token_ids = torch.empty(len(seqs), dtype=torch.int64, device=scaled.device)
        if not rows:
            return token_ids
        if len(rows) == len(seqs) and all(seq.params.logprobs is None for seq in seqs):
            sub, sub_seqs = scaled, list(seqs)  # truncated in place: nothing reads it after
        else:  # logprobs are taken before truncation, from `scaled`
            sub, sub_seqs = scaled[rows], [seqs[i] for i in rows]  # [R, vocab]
        _truncate(sub, sub_seqs)
        if self.draws_by_race:
            probs = _probs(sub)  # [R, vocab]
            token_ids[rows] = argmax(probs.div_(self._exponential_noise(probs, sub_seqs)))
        else:
            token_ids[rows] = inverse_cdf(sub, self._uniforms(sub_seqs))
        return token_ids

    def _exponential_noise(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Exp(1) noise [R, vocab], each seeded row's from its own generator."""
        noise = torch.empty_like(probs)  # [R, vocab]
        unseeded = [i for i, seq in enumerate(seqs) if seq.params.seed is None]
        if len(unseeded) == len(seqs):
            return noise.exponential_(generator=self.generator)
        if unseeded:
            noise[unseeded] = torch.empty(
                (len(unseeded), probs.shape[1]), device=probs.device
            ).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:
                noise[i].exponential_(generator=self._generator_of(seq))
        return noise

    def _uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """One number in [0, 1) per row [R] float64: from the row's own generator if seeded."""

        def draw(count: int, generator: torch.Generator) -> torch.Tensor:
            return torch.rand(count, dtype=torch.float64, device=self.device, generator=generator)

        uniforms = draw(len(seqs), self.generator)
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:
                uniforms[i] = draw(1, self._generator_of(seq))[0]
        return uniforms

    def _generator_of(self, seq: Sequence) -> torch.Generator:
        if seq.generator is None:
            seed = sample_seed(seq.params.seed or 0, seq.index)
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        generator: torch.Generator = seq.generator
        return generator


def inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row from softmax(logits) [R, vocab], given uniforms [R] in [0, 1);
    `logits` become the running weights (a fresh multi-MB tensor costs its page faults).

    The token is the first whose running weight passes u * total; a token of weight 0
    (a masked one) never is, since the running sum does not grow there. The running sum
    is float32: each token's share comes out within one rounding of the total (6e-8 of
    it), far below what any number of draws could show.
    """
    running = _weights(logits, in_place=True).cumsum_(dim=-1)  # [R, vocab]
    total = running[:, -1:]  # [R, 1], at least 1
    below_total = torch.nextafter(total, torch.zeros_like(total))  # u * total may round up
    scaled = uniforms.to(device=running.device, dtype=running.dtype).unsqueeze(1) * total
    return torch.searchsorted(running, torch.minimum(scaled, below_total), right=True).squeeze(1)


def _weights(logits: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """exp(logit - row max) [R, vocab], in [0, 1]; 0 where logit - row max <= WEIGHT_FLOOR.

    Below that float32 turns denormal, and on x86 denormal arithmetic is some 50 times
    slower: low temperatures spread logits far enough to make a quarter of a row
    denormal. The tokens dropped hold under 1e-38 of their row's largest weight each.
    """
    row_max = logits.amax(dim=-1, keepdim=True)
    # at most 0; `sub(out=logits)` would go through a temporary and a copy
    shifted = logits.sub_(row_max) if in_place else logits - row_max
    # -inf there, whose exp is an exact 0 and as fast as any other: two passes over the
    # row where a mask, a clamp and a fill took four
    return F.threshold(shifted, WEIGHT_FLOOR, float("-inf"), inplace=True).exp_()


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits) [R, vocab] without denormals (see `_weights`)."""
    weights = _weights(logits)
    return weights.div_(weights.sum(dim=-1, keepdim=True))


def _all_plain_greedy(seqs: Seq[Sequence]) -> bool:
    """Whether every row takes the argmax of its raw logits: the fast path, which reads
    either layout."""
    return all(seq.is_plain_greedy for seq in seqs)


def _sanitise(logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """NaN becomes -inf, +inf a large finite value; rows with nothing finite become uniform."""
    if _all_finite(logits.amax(dim=-1)):
        return logits, []
    logits = torch.nan_to_num(
        logits, nan=float("-inf"), posinf=POSINF_REPLACEMENT, neginf=float("-inf")
    )  # [N, vocab]; left to itself nan_to_num would make -inf finite, hiding a dead row
    dead = ~torch.isfinite(logits).any(dim=-1)  # [N]
    nonfinite = dead.nonzero().flatten().tolist()
    if nonfinite:
        logits[nonfinite] = 0.0
    return logits, nonfinite


def _all_finite(row_max: torch.Tensor) -> bool:
    """Whether every row's maximum is finite: no NaN, no +inf, no row without a finite logit.

    NaN and infinities propagate through the row maxima and their sum; -inf entries
    in a row (masked tokens) do not.
    """
    return math.isfinite(row_max.sum().item())


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """Repetition, frequency and presence penalties, in place, on `logits[rows]`.

    Only the tokens a row has seen change, so the work is on those columns [R, L] alone
    (L: the most distinct tokens any row has seen), never on the whole vocabulary: over
    32 rows of 50,257 the dense form took 20 ms a step.
    """
    seen = [list(dict.fromkeys(seq.token_ids)) for seq in seqs]  # prompt and output, once each
    width = max(len(tokens) for tokens in seen)
    columns: list[int] = []  # row by row: its seen tokens, padded with its first one
    counts: list[int] = []  # how often each came out
    for seq, tokens in zip(seqs, seen, strict=True):
        output = Counter(seq.output_token_ids)
        pad = width - len(tokens)  # a repeat of the first token gets its value, written twice
        columns += tokens + [tokens[0]] * pad
        counts += [*map(output.get, tokens, repeat(0)), *[output.get(tokens[0], 0)] * pad]
    device = logits.device
    rows_at = torch.tensor(rows, device=device).unsqueeze(1)  # [R, 1]
    at = (rows_at, torch.tensor(columns, device=device).view(len(seqs), width))  # [R, L]
    count = torch.tensor(counts, dtype=torch.float32, device=device).view(len(seqs), width)
    values = logits[at]  # [R, L]
    repetition = _column([s.params.repetition_penalty for s in seqs], device)  # [R, 1]
    values = torch.where(values > 0, values / repetition, values * repetition)
    values -= _column([s.params.frequency_penalty for s in seqs], device) * count
    values -= _column([s.params.presence_penalty for s in seqs], device) * (count > 0)
    # A penalty that underflows float32 (e.g. 1e-300) turns logits into +inf, and a banned
    # -inf logit into NaN (-inf * 0): keep banned tokens banned and the rest finite.
    logits[at] = torch.nan_to_num(
        values, nan=float("-inf"), posinf=POSINF_REPLACEMENT, neginf=float("-inf")
    )


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)  # [R, 1]


def _scale_by_temperature(
    logits: torch.Tensor, seqs: Seq[Sequence], greedy: list[bool]
) -> torch.Tensor:
    temperatures = [1.0 if g else s.params.temperature for s, g in zip(seqs, greedy, strict=True)]
    if all(t == 1.0 for t in temperatures):
        return logits
    return logits / _column(temperatures, logits.device)  # [N, vocab]


def _truncate(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """top_k, then top_p, then min_p, in place, on rows that ask for them."""
    vocab = logits.shape[1]
    top_k = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    min_p = [s.params.min_p for s in seqs]
    if any(p < 1.0 for p in top_p):
        mask_top_k_top_p(logits, top_k, top_p)
    elif any(k < vocab for k in top_k):
        mask_top_k(logits, top_k)
    if any(p > 0.0 for p in min_p):
        mask_min_p(logits, min_p)


def mask_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    """Keep, per row, every token whose logit is at least the row's k-th largest."""
    k = torch.tensor(top_k, device=logits.device).unsqueeze(1)  # [R, 1]
    top_values = logits.topk(max(top_k), dim=-1).values  # [R, max_k]
    threshold = top_values.gather(1, k - 1)  # [R, 1]
    logits.masked_fill_(logits < threshold, float("-inf"))


def mask_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    """top_k as in `mask_top_k`, then keep the smallest most-likely set reaching top_p,
    and any token exactly as likely as the least likely one in it (so that ties, which
    sorts order arbitrarily, are all kept or all dropped)."""
    if any(k < logits.shape[1] for k in top_k):
        mask_top_k(logits, top_k)
    probs = _probs(logits)  # [R, vocab]
    p = torch.tensor(top_p, device=logits.device).unsqueeze(1)  # [R, 1]
    logits.masked_fill_(probs < _nucleus_floor(probs, p), float("-inf"))


def _nucleus_floor(probs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[R, 1]: the probability of the least likely token in each row's nucleus."""
    candidates = min(TOP_P_CANDIDATES, probs.shape[1])
    top = probs.topk(candidates, dim=-1).values  # [R, candidates], most likely first
    mass_before = top.cumsum(dim=-1) - top  # exclusive
    size = (mass_before < p).sum(dim=-1, keepdim=True).clamp_(min=1)  # the first always stays
    floor = top.gather(1, size - 1)
    wider = (size.squeeze(1) == candidates).nonzero().flatten().tolist()
    if candidates < probs.shape[1] and wider:  # the nucleus goes on past the candidates
        floor[wider] = _floor_by_sorting(probs[wider], p[wider])
    return floor


def _floor_by_sorting(probs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The nucleus floor [W, 1] of every token sorted. Ascending, token j is in the nucleus
    when the mass above it, total - cumsum[j], is less than p: a binary search in the
    cumulative sum. On the CPU numpy sorts (4.9 ms for 32 rows of 50,257, torch 51 ms)."""
    if probs.device.type == "cpu":
        ascending = torch.from_numpy(np.sort(probs.numpy(), axis=-1))
    else:
        ascending = probs.sort(dim=-1).values
    running = ascending.cumsum(dim=-1)  # [W, vocab]
    above_limit = running[:, -1:] - p  # the nucleus: running sum past this
    first = torch.searchsorted(running, above_limit, right=True)  # [W, 1]
    return ascending.gather(1, first.clamp_(max=ascending.shape[1] - 1))


def mask_min_p(logits: torch.Tensor, min_p: list[float]) -> None:
    """Keep the tokens whose probability is at least min_p times the row's largest."""
    probs = _probs(logits)  # [R, vocab]
    threshold = probs.amax(dim=-1, keepdim=True) * _column(min_p, logits.device)
    logits.masked_fill_(probs < threshold, float("-inf"))


def _gather_logprobs(
    scaled: torch.Tensor, token_ids: torch.Tensor, seqs: Seq[Sequence]
) -> list[RowLogprobs | None]:
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    logprobs = torch.log_softmax(scaled[rows], dim=-1)  # [R, vocab]
    chosen = logprobs.gather(1, token_ids[rows].unsqueeze(1)).squeeze(1).tolist()  # [R]
    num_top = max(seqs[i].params.logprobs or 0 for i in rows)
    top_values, top_ids = logprobs.topk(num_top, dim=-1)  # [R, num_top]
    values, ids = top_values.tolist(), top_ids.tolist()
    result: list[RowLogprobs | None] = [None] * len(seqs)
    for j, i in enumerate(rows):
        k = seqs[i].params.logprobs or 0
        result[i] = RowLogprobs(chosen[j], ids[j][:k], values[j][:k])
    return result
