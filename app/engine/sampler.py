"""Vectorised sampling over one step's rows, each with its own parameters and seed.

The order of processing, per row:
1. repetition penalty (over prompt and output tokens: positive logits divided,
   negative ones multiplied), then frequency and presence penalties (over
   output tokens: `logit -= frequency * count + presence * (count > 0)`);
2. the row's logit_bias is added to its tokens' logits (OpenAI's -100..100: a
   bias of -100 all but bans a token, +100 all but forces it);
3. while fewer than `min_tokens` are generated, EOS and stop token ids are masked
   (after the bias, so that no bias ends a completion early); then rows held to a
   response_format keep only the tokens their grammar allows (app/engine/structured.py);
4. greedy rows (temperature below GREEDY_TEMPERATURE) take the argmax here;
5. the others divide by their temperature, then keep the top_k tokens (every
   token whose logit ties the k-th largest stays), then the smallest set of
   most likely tokens whose probability reaches top_p, then the tokens whose
   probability is at least min_p times the largest, and draw one token.

Logprobs are the log-softmax of the logits after steps 1-3 and the temperature
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
its own logits and seed, not on its batch-mates (a refused draw takes its next
number from the same generator).

Truncation (top_k, top_p, min_p) is `truncation`'s; on the CPU top_p and min_p are
applied by accepting or refusing draws instead (`cdf_draw`), which needs no sort.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from itertools import repeat

import torch

from app.engine.argmax import argmax, max_and_argmax
from app.engine.cdf_draw import draw_truncated
from app.engine.sequence import Sequence
from app.engine.structured import blocked_tokens
from app.engine.topk import topk
from app.engine.truncation import column, probabilities, truncate, truncation_params

POSINF_REPLACEMENT = 1e30  # +inf logits become this, so that softmax stays defined


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
        # logprobs first: the draw truncates `scaled` in place
        logprobs = _log_softmax_of_rows(scaled, seqs) if wants_logprobs else None
        token_ids = self._draw(scaled, seqs, greedy)  # [N]
        row_logprobs = _gather_logprobs(logprobs, token_ids, seqs) if logprobs is not None else None
        return SamplerOutput(token_ids.tolist(), row_logprobs or [None] * len(seqs), nonfinite)

    def _apply_logit_processors(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
        penalised = [i for i, seq in enumerate(seqs) if seq.has_penalties]
        if penalised:
            apply_penalties(logits, [seqs[i] for i in penalised], penalised)
        biased = [i for i, seq in enumerate(seqs) if seq.params.logit_bias]
        if biased:
            apply_logit_bias(logits, [seqs[i] for i in biased], biased)
        below_min = [
            i for i, seq in enumerate(seqs) if seq.num_output_tokens < seq.params.min_tokens
        ]
        for i in below_min:
            banned = list(seqs[i].params.stop_token_ids)
            if not seqs[i].params.ignore_eos:
                banned += self.eos_token_ids
            logits[i, banned] = float("-inf")
        constrained = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
        if constrained:
            matchers = [seqs[i].matcher for i in constrained]
            blocked = blocked_tokens(matchers, logits.shape[1], logits.device)  # [R, vocab]
            if len(constrained) == len(seqs):
                logits.masked_fill_(blocked, float("-inf"))
            else:
                logits[constrained] = logits[constrained].masked_fill_(blocked, float("-inf"))

    def _draw(self, scaled: torch.Tensor, seqs: Seq[Sequence], greedy: list[bool]) -> torch.Tensor:
        """One token per row: argmax for greedy rows, a truncated categorical draw for others."""
        rows = [i for i, is_greedy in enumerate(greedy) if not is_greedy]
        if len(rows) < len(seqs):
            token_ids = argmax(scaled)  # [N]
        else:
            token_ids = torch.empty(len(seqs), dtype=torch.int64, device=scaled.device)
        if not rows:
            return token_ids
        if len(rows) == len(seqs):
            sub, sub_seqs = scaled, list(seqs)  # truncated in place: nothing reads it after
        else:
            sub, sub_seqs = scaled[rows], [seqs[i] for i in rows]  # [R, vocab]
        top_k, top_p, min_p = truncation_params(sub_seqs, sub.shape[1])
        if self.draws_by_race:
            truncate(sub, top_k, top_p, min_p)
            probs = probabilities(sub)  # [R, vocab]
            token_ids[rows] = argmax(probs.div_(self._exponential_noise(probs, sub_seqs)))
            return token_ids

        def uniforms(indices: list[int]) -> torch.Tensor:
            return self._uniforms([sub_seqs[i] for i in indices])

        token_ids[rows] = draw_truncated(sub, top_k, top_p, min_p, uniforms)
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
    repetition = column([s.params.repetition_penalty for s in seqs], device)  # [R, 1]
    values = torch.where(values > 0, values / repetition, values * repetition)
    values -= column([s.params.frequency_penalty for s in seqs], device) * count
    values -= column([s.params.presence_penalty for s in seqs], device) * (count > 0)
    # A penalty that underflows float32 (e.g. 1e-300) turns logits into +inf, and a banned
    # -inf logit into NaN (-inf * 0): keep banned tokens banned and the rest finite.
    logits[at] = torch.nan_to_num(
        values, nan=float("-inf"), posinf=POSINF_REPLACEMENT, neginf=float("-inf")
    )


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """Each sequence's logit_bias added, in place, to its tokens' logits in `logits[rows]`."""
    entries = [
        (row, token, bias)
        for row, seq in zip(rows, seqs, strict=True)
        for token, bias in seq.params.logit_bias.items()
    ]
    device = logits.device
    at_rows, at_tokens, biases = zip(*entries, strict=True)
    logits.index_put_(
        (torch.tensor(at_rows, device=device), torch.tensor(at_tokens, device=device)),
        torch.tensor(biases, dtype=logits.dtype, device=device),
        accumulate=True,
    )


def _scale_by_temperature(
    logits: torch.Tensor, seqs: Seq[Sequence], greedy: list[bool]
) -> torch.Tensor:
    temperatures = [1.0 if g else s.params.temperature for s, g in zip(seqs, greedy, strict=True)]
    if all(t == 1.0 for t in temperatures):
        return logits
    # in place: a fresh [N, vocab] tensor is 6.4 MB at 32 rows, and page faults where the
    # allocator hands it back every step (BENCHMARKS.md, "Temperature applied in place")
    return logits.div_(column(temperatures, logits.device))  # [N, vocab]


def _log_softmax_of_rows(
    scaled: torch.Tensor, seqs: Seq[Sequence]
) -> tuple[list[int], torch.Tensor]:
    """The rows that ask for logprobs, and their log-softmax [R, vocab]."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    asking = scaled if len(rows) == len(seqs) else scaled[rows]  # a copy of rows costs 2 ms
    return rows, torch.log_softmax(asking, dim=-1)


def _gather_logprobs(
    logprobs_of_rows: tuple[list[int], torch.Tensor], token_ids: torch.Tensor, seqs: Seq[Sequence]
) -> list[RowLogprobs | None]:
    rows, logprobs = logprobs_of_rows  # [R, vocab]
    chosen = logprobs.gather(1, token_ids[rows].unsqueeze(1)).squeeze(1).tolist()  # [R]
    num_top = max(seqs[i].params.logprobs or 0 for i in rows)
    top_values, top_ids = topk(logprobs, num_top)  # [R, num_top]
    values, ids = top_values.tolist(), top_ids.tolist()
    result: list[RowLogprobs | None] = [None] * len(seqs)
    for j, i in enumerate(rows):
        k = seqs[i].params.logprobs or 0
        result[i] = RowLogprobs(chosen[j], ids[j][:k], values[j][:k])
    return result
