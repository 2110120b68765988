"""The logit processors: what a row's parameters and history do to its logits before the
draw. Each works in place on the rows that ask for it and leaves the others untouched.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import repeat
from typing import Any

import numpy as np
import torch

from app.engine.sampling.kernels import column
from app.engine.sequence import Sequence

POSINF_REPLACEMENT = 1e30  # +inf logits become this, so that softmax stays defined


def ban_tokens(logits: torch.Tensor, token_ids: list[int]) -> None:
    """Tokens no row may sample (a multimodal model's image placeholder, which only
    images may fill)."""
    if token_ids:
        logits[:, token_ids] = float("-inf")


def sanitise(logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """NaN becomes -inf, +inf a large finite value; rows with nothing finite become uniform
    (and are returned as the second value)."""
    if all_finite(logits.amax(dim=-1)):
        return logits, []
    logits = torch.nan_to_num(
        logits, nan=float("-inf"), posinf=POSINF_REPLACEMENT, neginf=float("-inf")
    )  # [N, vocab]; left to itself nan_to_num would make -inf finite, hiding a dead row
    dead = ~torch.isfinite(logits).any(dim=-1)  # [N]
    nonfinite = dead.nonzero().flatten().tolist()
    if nonfinite:
        logits[nonfinite] = 0.0
    return logits, nonfinite


def all_finite(row_max: torch.Tensor) -> bool:
    """Whether every row's maximum is finite: no NaN, no +inf, no row without a finite logit.

    NaN and infinities propagate through the row maxima and their sum; -inf entries
    in a row (masked tokens) do not.
    """
    return math.isfinite(row_max.sum().item())


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Repetition penalty over prompt and output tokens (positive logits divided, negative
    ones multiplied), then frequency and presence penalties over output tokens:
    `logit -= frequency * count + presence * (count > 0)`.

    Only the tokens a row has seen change, so the work is on those columns [R, L] alone
    (L: the most distinct tokens any row has seen), never on the whole vocabulary.
    """
    rows = [i for i, seq in enumerate(seqs) if seq.has_penalties]
    if not rows:
        return
    penalised = [seqs[i] for i in rows]
    at, count = _seen_columns(penalised, rows, logits.device)  # [R, L] each
    values = logits[at]  # [R, L]
    repetition = column([s.params.repetition_penalty for s in penalised], logits.device)
    values = torch.where(values > 0, values / repetition, values * repetition)
    values -= column([s.params.frequency_penalty for s in penalised], logits.device) * count
    values -= column([s.params.presence_penalty for s in penalised], logits.device) * (count > 0)
    # A penalty that underflows float32 (e.g. 1e-300) turns logits into +inf, and a banned
    # -inf logit into NaN (-inf * 0): keep banned tokens banned and the rest finite.
    logits[at] = torch.nan_to_num(
        values, nan=float("-inf"), posinf=POSINF_REPLACEMENT, neginf=float("-inf")
    )


def _seen_columns(
    seqs: list[Sequence], rows: list[int], device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The index of each row's seen tokens (rows [R, 1], columns [R, L]), each row padded
    with a repeat of its first token (which writes the same value twice), and how often
    each came out [R, L] float32."""
    seen = [list(dict.fromkeys(seq.token_ids)) for seq in seqs]  # prompt and output, once each
    width = max(len(tokens) for tokens in seen)
    columns: list[int] = []
    counts: list[int] = []
    for seq, tokens in zip(seqs, seen, strict=True):
        output = Counter(seq.output_token_ids)
        pad = width - len(tokens)
        columns += tokens + [tokens[0]] * pad
        counts += [*map(output.get, tokens, repeat(0)), *[output.get(tokens[0], 0)] * pad]
    rows_at = torch.tensor(rows, device=device).unsqueeze(1)  # [R, 1]
    at = (rows_at, torch.tensor(columns, device=device).view(len(seqs), width))  # [R, L]
    count = torch.tensor(counts, dtype=torch.float32, device=device).view(len(seqs), width)
    return at, count


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Each row's logit_bias added to its tokens' logits (OpenAI's -100..100: a bias of
    -100 all but bans a token, +100 all but forces it)."""
    entries = [
        (row, token, bias)
        for row, seq in enumerate(seqs)
        if seq.params.logit_bias
        for token, bias in seq.params.logit_bias.items()
    ]
    if not entries:
        return
    device = logits.device
    at_rows, at_tokens, biases = zip(*entries, strict=True)
    logits.index_put_(
        (torch.tensor(at_rows, device=device), torch.tensor(at_tokens, device=device)),
        torch.tensor(biases, dtype=logits.dtype, device=device),
        accumulate=True,
    )


def ban_stop_tokens_before_min_tokens(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]
) -> None:
    """While a row has fewer than min_tokens output tokens, its stop token ids and EOS
    (unless it ignores EOS) are banned; after the bias, so that no bias ends it early."""
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            banned = list(seq.params.stop_token_ids)
            if not seq.params.ignore_eos:
                banned += eos_token_ids
            logits[row, banned] = float("-inf")


def apply_grammar_masks(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Rows held to a grammar (response_format, forced tool calls) keep only the tokens
    their matcher allows next (app/engine/structured.py)."""
    constrained = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
    if not constrained:
        return
    matchers = [seqs[i].matcher for i in constrained]
    blocked = blocked_tokens(matchers, logits.shape[1], logits.device)  # [R, vocab]
    if len(constrained) == len(seqs):
        logits.masked_fill_(blocked, float("-inf"))
    else:
        logits[constrained] = logits[constrained].masked_fill_(blocked, float("-inf"))


def blocked_tokens(matchers: list[Any], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[R, vocab_size] bool: True for the tokens each matcher does not allow next.

    llguidance sets one bit per allowed token, least significant first (token t is bit
    t % 8 of byte t // 8): numpy unpacks the inverted bytes in one pass, where a torch
    shift and AND per bit took several times as long.
    """
    packed = np.stack([np.frombuffer(m.compute_bitmask(), dtype=np.uint8) for m in matchers])
    bits = np.unpackbits(~packed, axis=1, count=vocab_size, bitorder="little")  # [R, vocab]
    return torch.from_numpy(bits.view(np.bool_)).to(device, non_blocking=True)


def scale_by_temperature(
    logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]
) -> torch.Tensor:
    """Each row divided by its temperature (1 for greedy rows, whose logprobs are those of
    the processed logits)."""
    temperatures = [1.0 if g else s.params.temperature for s, g in zip(seqs, greedy, strict=True)]
    if all(t == 1.0 for t in temperatures):
        return logits
    # in place: a fresh [N, vocab] tensor is 6.4 MB at 32 rows, and page faults where the
    # allocator hands it back every step (BENCHMARKS.md, "Temperature applied in place")
    return logits.div_(column(temperatures, logits.device))  # [N, vocab]
