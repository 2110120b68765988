"""Logprobs of the sampled token and of the top alternatives in its row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.engine.sampling.kernels import topk
from app.engine.sequence import Sequence


@dataclass
class RowLogprobs:
    """Logprobs of one sampled token and of the top alternatives in its row."""

    token_logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


def log_softmax_of_rows(
    scaled: torch.Tensor, seqs: list[Sequence]
) -> tuple[list[int], torch.Tensor]:
    """The rows that ask for logprobs, and their log-softmax [R, vocab]."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    asking = scaled if len(rows) == len(seqs) else scaled[rows]  # a copy of rows is one more pass
    return rows, torch.log_softmax(asking, dim=-1)


def gather_logprobs(
    logprobs_of_rows: tuple[list[int], torch.Tensor], token_ids: torch.Tensor, seqs: list[Sequence]
) -> list[RowLogprobs | None]:
    """Each asking row's sampled token and top alternatives; None for the other rows."""
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
