"""The per-example loss and the running exact-match accuracy shown while training."""

from __future__ import annotations

from collections import defaultdict, deque

import torch
import torch.nn.functional as F

from models.scenes.data import Batch


def batch_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy weighted so that each answer counts once, however many tokens it has."""
    token_loss = F.cross_entropy(
        logits.float().transpose(1, 2), batch.targets, reduction="none"
    )  # [B, L]
    return (token_loss * batch.weights).sum()


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
