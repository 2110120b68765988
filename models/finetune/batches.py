"""Examples -> padded batches, and the per-token loss and accuracy of a batch."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from models.finetune.encode import IGNORE, Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE on prompts and padding
    pixel_values: torch.Tensor | None  # [images in the batch, 3, H, W], in row order


def shuffled(
    examples: list[Example], batch_size: int, rng: random.Random
) -> Iterator[list[Example]]:
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]


def in_order(examples: list[Example], batch_size: int) -> Iterator[list[Example]]:
    for start in range(0, len(examples), batch_size):
        yield examples[start : start + batch_size]


def collate(examples: list[Example], pad_id: int, device: torch.device) -> Batch:
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        attention_mask[row, :size] = 1
    images = [e.pixel_values for e in examples if e.pixel_values is not None]
    pixel_values = torch.cat(images).to(device) if images else None
    return Batch(input_ids.to(device), attention_mask.to(device), labels.to(device), pixel_values)


@dataclass
class TokenScores:
    losses: torch.Tensor  # [B, T-1], 0 where not labelled
    labelled: torch.Tensor  # [B, T-1] bool
    correct: torch.Tensor  # [B, T-1] bool: the argmax is the label


def score(model: nn.Module, batch: Batch) -> TokenScores:
    """Each labelled token's loss, and whether greedy decoding would pick it."""
    kwargs = {"pixel_values": batch.pixel_values} if batch.pixel_values is not None else {}
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).logits
    logits = logits[:, :-1].float()  # [B, T-1, vocab]: position t predicts token t + 1
    targets = batch.labels[:, 1:]  # [B, T-1]
    losses = functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
    )
    labelled = targets != IGNORE
    return TokenScores(losses, labelled, (logits.argmax(-1) == targets) & labelled)
