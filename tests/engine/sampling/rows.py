"""Rows of logits and the sequences they belong to, for the sampling tests."""

from __future__ import annotations

import torch

from app.engine.sequence import SamplingParams, Sequence

EOS = 0
CPU = torch.device("cpu")


def make_seq(
    prompt: list[int] | None = None, output: list[int] | None = None, **params: object
) -> Sequence:
    seq = Sequence(0, "r", 0, prompt or [1], SamplingParams(**params))  # type: ignore[arg-type]
    seq.token_ids += output or []
    return seq


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


def probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()
