"""The settings of one fine-tuning run; each default is written here once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FinetuneConfig:
    model: Path  # the base checkpoint folder
    data: Path  # training JSONL
    out: Path  # the adapter folder to write
    eval_data: Path | None = None
    rank: int = 8
    alpha: int = 16  # the update is scaled by alpha / rank
    dropout: float = 0.0
    # Leaf names of the decoder's linear layers; empty: every attention and MLP projection.
    target_modules: tuple[str, ...] = ()
    train_projector: bool = False  # also adapt the multimodal projector's linear layers
    learning_rate: float = 1e-3
    epochs: int = 3
    max_steps: int | None = None  # when set, stops after this many steps whatever `epochs` says
    batch_size: int = 8
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    device: str = "cpu"
    progress: bool = True  # a tqdm bar on stderr

    def __post_init__(self) -> None:
        positive = {"rank": self.rank, "epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, not {self.max_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, not {self.learning_rate}")
