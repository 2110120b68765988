"""The sampler: one token per row of a step's logits, each row with its own parameters
and seed.

`Sampler.sample` is the pipeline, stage by stage, each on the rows that ask for it:
banned tokens, penalties, logit_bias, min_tokens' bans of EOS and stop tokens, grammar
masks, temperature, logprobs, then truncation (top_k, top_p, min_p) and the draw, which
is the argmax for greedy rows (temperature below GREEDY_TEMPERATURE). Logprobs are the
log-softmax after temperature (1 for greedy rows) and before truncation, so every
alternative has a finite value: vLLM's "processed logprobs" minus the truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.engine.sampling.draw import draw_tokens
from app.engine.sampling.kernels import argmax, max_and_argmax
from app.engine.sampling.logprobs import RowLogprobs, gather_logprobs, log_softmax_of_rows
from app.engine.sampling.processors import (
    all_finite,
    apply_grammar_masks,
    apply_logit_bias,
    apply_penalties,
    ban_stop_tokens_before_min_tokens,
    ban_tokens,
    sanitise,
    scale_by_temperature,
)
from app.engine.sampling.randomness import RowRandomness
from app.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[RowLogprobs | None]  # one per row; None where not asked for
    nonfinite_rows: list[int]  # rows whose logits had no finite value (sampled from uniform)


class Sampler:
    def __init__(
        self,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        seed: int = 0,
        banned_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.eos_token_ids = eos_token_ids
        self.banned_token_ids = list(banned_token_ids)  # never sampled (image placeholders)
        self.randomness = RowRandomness(device, seed)
        self.draws_by_race = device.type != "cpu"  # see app/engine/sampling/draw.py

    @staticmethod
    def wants_row_major(seqs: list[Sequence]) -> bool:
        """Whether the logits of these rows should come as contiguous rows: every path but
        plain greedy works row by row, and the output layer makes rows cheaper than a copy
        of its transposed result."""
        return not _all_plain_greedy(seqs)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [N, vocab] float32, row i for `seqs[i]`. May modify logits in place."""
        row_logprobs: list[RowLogprobs | None] = [None] * len(seqs)  # where asked for
        ban_tokens(logits, self.banned_token_ids)
        if _all_plain_greedy(seqs):
            row_max, token_ids = max_and_argmax(logits)  # [N], [N]
            if all_finite(row_max):
                return SamplerOutput(token_ids.tolist(), row_logprobs, [])
        logits, nonfinite = sanitise(logits.contiguous())  # the rest works row by row
        if nonfinite:  # rows reset to uniform lost their bans
            ban_tokens(logits, self.banned_token_ids)
        apply_penalties(logits, seqs)
        apply_logit_bias(logits, seqs)
        ban_stop_tokens_before_min_tokens(logits, seqs, self.eos_token_ids)
        apply_grammar_masks(logits, seqs)
        greedy = [seq.is_greedy for seq in seqs]
        wants_logprobs = any(seq.params.logprobs is not None for seq in seqs)
        if all(greedy) and not wants_logprobs:
            return SamplerOutput(argmax(logits).tolist(), row_logprobs, nonfinite)
        scaled = scale_by_temperature(logits, seqs, greedy)  # [N, vocab]
        # logprobs first: the draw truncates `scaled` in place
        logprobs = log_softmax_of_rows(scaled, seqs) if wants_logprobs else None
        token_ids = draw_tokens(scaled, seqs, greedy, self.randomness, self.draws_by_race)
        if logprobs is not None:
            row_logprobs = gather_logprobs(logprobs, token_ids, seqs)
        return SamplerOutput(token_ids.tolist(), row_logprobs, nonfinite)


def _all_plain_greedy(seqs: list[Sequence]) -> bool:
    """Whether every row takes the argmax of its raw logits: the fast path, which reads
    either layout."""
    return all(seq.is_plain_greedy for seq in seqs)
