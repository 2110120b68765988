"""`python -m models.scenes.train --out DIR`: train the scenes model from scratch on the CPU.

Stage 1 learns the language from scene text alone; stage 2 learns to see, on single-turn
caption and question requests about an image, rendered as the server renders them.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

from models.scenes.checkpoint import save_checkpoint
from models.scenes.config import TINY, ModelSize, image_processor, llava_config
from models.scenes.data import CAPTION_UNITS, Batch, image_batch, text_batch
from models.scenes.metrics import TaskAccuracy, batch_loss, grounding_loss
from models.scenes.tokenizer import build_tokenizer
from models.scenes.world import TRAIN_SEED_END

TEXT_SEED_START = 0  # stage 1 scenes; stage 2 takes the upper half of the training range
IMAGE_SEED_START = TRAIN_SEED_END // 2


@dataclass(frozen=True)
class Recipe:
    out: Path
    size: ModelSize
    text_steps: int
    image_steps: int
    batch_size: int
    text_rows: int
    lr: float
    warmup: int
    seed: int
    max_minutes: float
    save_every: int
    log_every: int
    caption_units: float
    grounding: float
    init: Path | None = None


def parse_args(argv: list[str] | None = None) -> Recipe:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--text-steps", type=int, default=40)
    parser.add_argument("--image-steps", type=int, default=4500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--text-rows", type=int, default=4, help="text rows per stage 2 batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=95.0)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a minute-sized model for smoke runs")
    parser.add_argument("--patch-size", type=int, default=ModelSize.patch_size)
    parser.add_argument("--init", type=Path, help="start from this checkpoint's weights")
    parser.add_argument(
        "--caption-units",
        type=float,
        default=CAPTION_UNITS,
        help="loss units per object described by a caption (a QA answer is 1)",
    )
    parser.add_argument(
        "--grounding",
        type=float,
        default=1.0,
        help="weight of the patch grounding loss (colour and shape words at image tokens)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.text_rows < args.batch_size:
        parser.error("--text-rows must leave at least one image row in a batch")
    torch.set_num_threads(args.threads)
    return Recipe(
        out=args.out,
        size=TINY if args.tiny else ModelSize(patch_size=args.patch_size),
        text_steps=args.text_steps,
        image_steps=args.image_steps,
        batch_size=args.batch_size,
        text_rows=args.text_rows,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        max_minutes=args.max_minutes,
        save_every=args.save_every,
        log_every=args.log_every,
        caption_units=args.caption_units,
        grounding=args.grounding,
        init=args.init,
    )


def learning_rate(recipe: Recipe, step: int, progress: float) -> float:
    """Linear warm-up over steps, then cosine decay to a tenth as progress goes 0 -> 1."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    cosine = 0.5 * (1.0 + math.cos(min(1.0, progress) * math.pi))
    return recipe.lr * (0.1 + 0.9 * cosine)


class Trainer:
    def __init__(self, recipe: Recipe) -> None:
        torch.manual_seed(recipe.seed)
        self.recipe = recipe
        self.tokenizer: PreTrainedTokenizerFast = build_tokenizer()
        self.processor = image_processor()
        self.model = (
            LlavaForConditionalGeneration.from_pretrained(recipe.init)
            if recipe.init
            else LlavaForConditionalGeneration(llava_config(recipe.size, self.tokenizer))
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01
        )
        self.started = time.monotonic()

    def batch(self, step: int) -> Batch:
        """Stage 1: scene text only. Stage 2: image requests, plus a few text rows so that
        plain-text completion is not forgotten."""
        size = self.recipe.batch_size
        offset = self.recipe.seed * 1_000_000 + step * size
        if step < self.recipe.text_steps:
            seeds = range(TEXT_SEED_START + offset, TEXT_SEED_START + offset + size)
            return text_batch(self.tokenizer, seeds)
        image_rows = size - self.recipe.text_rows
        image_seeds = range(IMAGE_SEED_START + offset, IMAGE_SEED_START + offset + image_rows)
        text_seeds = range(
            TEXT_SEED_START + offset, TEXT_SEED_START + offset + self.recipe.text_rows
        )
        return image_batch(
            self.tokenizer,
            self.processor,
            image_seeds,
            self.recipe.size.image_seq_length,
            text_seeds,
            caption_units=self.recipe.caption_units,
        )

    def progress(self, step: int) -> float:
        """How far training is, by steps or by the wall-clock limit, whichever is further.

        On a quiet machine the step count binds and a run is deterministic from its seed;
        on a busy one the schedule is compressed to end, annealed, at --max-minutes.
        """
        total = self.recipe.text_steps + self.recipe.image_steps
        elapsed = (time.monotonic() - self.started) / (60 * self.recipe.max_minutes)
        return max(step / total, elapsed)

    def train_step(self, step: int, accuracy: TaskAccuracy) -> float:
        batch = self.batch(step)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.recipe, step, self.progress(step))
        logits = self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
        ).logits  # [B, L, vocab]
        loss = batch_loss(logits, batch)
        if self.recipe.grounding and batch.pixel_values is not None:
            loss = loss + self.recipe.grounding * grounding_loss(logits, batch)
        accuracy.update(logits.detach(), batch)  # scored before the update: unseen scenes
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.item()

    def save(self) -> None:
        save_checkpoint(self.model, self.tokenizer, self.recipe.out)

    def run(self) -> None:
        total = self.recipe.text_steps + self.recipe.image_steps
        accuracy = TaskAccuracy(window=self.recipe.log_every * 5)
        self.model.train()
        progress = tqdm(range(total), desc="train", mininterval=5.0)
        for step in progress:
            loss = self.train_step(step, accuracy)
            if (step + 1) % self.recipe.log_every == 0:
                progress.set_postfix_str(f"loss={loss:.4f} {accuracy.summary()}")
            if (step + 1) % self.recipe.save_every == 0:
                self.save()
            if self.progress(step + 1) >= 1.0:
                break
        self.save()
        minutes = (time.monotonic() - self.started) / 60
        progress.write(f"done: {step + 1} steps in {minutes:.1f} min; {accuracy.summary()}")


def main(argv: list[str] | None = None) -> None:
    Trainer(parse_args(argv)).run()


if __name__ == "__main__":
    main()
