"""The training loop and the per-epoch evaluation."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from models.finetune.batches import collate, in_order, score, shuffled
from models.finetune.encode import Example


@dataclass
class EvalResult:
    loss: float  # mean over the answers' tokens
    exact_match: float  # share of examples whose every answer token is the greedy choice
    examples: int


@dataclass
class History:
    step_losses: list[float] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int) -> EvalResult:
    """Teacher-forced: an example is an exact match when greedy decoding reproduces all its
    answers token for token, the end of turn included."""
    was_training = model.training
    model.eval()
    loss_sum, tokens, exact = 0.0, 0, 0
    device = next(model.parameters()).device
    for chunk in in_order(examples, batch_size):
        scores = score(model, collate(chunk, pad_id, device))
        loss_sum += float(scores.losses.sum())
        tokens += int(scores.labelled.sum())
        exact += int((scores.correct == scores.labelled).all(dim=1).sum())
    model.train(was_training)
    return EvalResult(loss_sum / max(tokens, 1), exact / max(len(examples), 1), len(examples))


@dataclass
class Plan:
    epochs: int
    steps_per_epoch: int
    total_steps: int


def plan(num_examples: int, batch_size: int, epochs: int, max_steps: int | None) -> Plan:
    """`max_steps`, when given, decides the length; the last epoch may stop part-way."""
    per_epoch = math.ceil(num_examples / batch_size)
    if max_steps is None:
        return Plan(epochs, per_epoch, epochs * per_epoch)
    return Plan(math.ceil(max_steps / per_epoch), per_epoch, max_steps)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[list[Example]],
    pad_id: int,
    on_step: Callable[[float], None],
) -> float:
    """One pass over `batches`; returns the mean training loss over their answer tokens."""
    model.train()
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for chunk in batches:
        scores = score(model, collate(chunk, pad_id, device))
        count = int(scores.labelled.sum())
        loss = scores.losses.sum() / max(count, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * count
        tokens += count
        on_step(loss.item())
    return loss_sum / max(tokens, 1)


def epoch_batches(
    examples: list[Example], batch_size: int, rng: random.Random, limit: int
) -> list[list[Example]]:
    return list(shuffled(examples, batch_size, rng))[:limit]
