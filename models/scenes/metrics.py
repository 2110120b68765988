"""The per-example loss and the running exact-match accuracy shown while training."""

from __future__ import annotations

from collections import defaultdict, deque

import torch
import torch.nn.functional as F

from models.scenes.data import IGNORE, Batch


def batch_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy weighted so that each answer counts once, however many tokens it has."""
    token_loss = F.cross_entropy(
        logits.float().transpose(1, 2), batch.targets, reduction="none"
    )  # [B, L]
    return (token_loss * batch.weights).sum()


def grounding_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """At each image token whose patch an object covers, the logits name the object's colour
    and its shape: word-aligned features in every patch, which a question's words can then
    attend to (a lookup by content), where captioning alone teaches lookups by position."""
    assert batch.patch_colour is not None and batch.patch_shape is not None
    if not bool((batch.patch_colour != IGNORE).any()):  # cross-entropy over nothing is NaN
        return logits.sum() * 0.0
    flat = logits.float().flatten(0, 1)  # [B * L, vocab]
    colour = F.cross_entropy(flat, batch.patch_colour.flatten(), ignore_index=IGNORE)
    shape = F.cross_entropy(flat, batch.patch_shape.flatten(), ignore_index=IGNORE)
    return (colour + shape) / 2


class TaskAccuracy:
    """Teacher-forced exact match per task over the last `window` answers of each task.

    An answer is exact under teacher forcing exactly when greedy decoding reproduces it,
    so this tracks the evaluation metric without generating.
    """

    def __init__(self, window: int) -> None:
        self.hits: dict[str, deque[bool]] = defaultdict(lambda: deque(maxlen=window))

    def update(self, logits: torch.Tensor, batch: Batch) -> None:
        correct = (logits.argmax(dim=-1) == batch.targets).tolist()  # [B, L]
        for row, spans in enumerate(batch.answers):
            for task, first, end in spans:
                self.hits[task].append(all(correct[row][first:end]))

    def summary(self) -> str:
        parts = [f"{task[:4]}={sum(hits) / len(hits):.3f}" for task, hits in self.hits.items()]
        return " ".join(sorted(parts))
