"""`finetune(config)`: check all the data, train the adapter, write the folder."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.finetune.config import FinetuneConfig
from models.finetune.data import DataError, read_conversations
from models.finetune.encode import Example, PromptFormat, encode_all
from models.finetune.lora import add_lora, load_base_model, load_prompt_format
from models.finetune.report import draw_loss_curve, write_metrics
from models.finetune.train import History, epoch_batches, evaluate, plan, train_epoch


def load_examples(prompt_format: PromptFormat, paths: list[Path]) -> list[list[Example]]:
    """The examples of each file; raises DataError naming every bad line of every file."""
    loaded: list[list[Example]] = []
    problems: list[str] = []
    for path in paths:
        conversations, read_problems = read_conversations(path)
        examples, encode_problems = encode_all(prompt_format, conversations)
        loaded.append(examples)
        problems += read_problems + encode_problems
    if problems:
        raise DataError(problems)
    return loaded


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Trains a LoRA adapter and writes it to `config.out`; returns the metrics written."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    prompt_format = load_prompt_format(config.model)
    paths = [config.data] + ([config.eval_data] if config.eval_data else [])
    train_examples, *rest = load_examples(prompt_format, paths)
    eval_examples = rest[0] if rest else []
    model = add_lora(load_base_model(config.model, config.device), config)
    pad_id = prompt_format.tokenizer.pad_token_id or 0
    started = time.perf_counter()
    history = _train(model, config, train_examples, eval_examples, pad_id)
    config.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(config.out))
    metrics = _metrics(config, history, len(train_examples), len(eval_examples), started)
    write_metrics(config.out, metrics)
    eval_points = [(int(e["step"]), e["eval_loss"]) for e in history.epochs if "eval_loss" in e]
    draw_loss_curve(config.out, history.step_losses, eval_points)
    return metrics


def _train(
    model: torch.nn.Module,
    config: FinetuneConfig,
    train_examples: list[Example],
    eval_examples: list[Example],
    pad_id: int,
) -> History:
    schedule = plan(len(train_examples), config.batch_size, config.epochs, config.max_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    rng, history = random.Random(config.seed), History()
    history.epochs.append(_epoch_row(model, 0, 0, None, eval_examples, config, pad_id))
    bar = tqdm(total=schedule.total_steps, disable=not config.progress, desc="finetune")
    bar.write(_summary(history.epochs[0]))

    def on_step(loss: float) -> None:
        history.step_losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    for epoch in range(1, schedule.epochs + 1):
        left = schedule.total_steps - len(history.step_losses)
        batches = epoch_batches(train_examples, config.batch_size, rng, left)
        train_loss = train_epoch(model, optimizer, batches, pad_id, on_step)
        step = len(history.step_losses)
        history.epochs.append(
            _epoch_row(model, epoch, step, train_loss, eval_examples, config, pad_id)
        )
        bar.write(_summary(history.epochs[-1]))
    bar.close()
    return history


def _epoch_row(
    model: torch.nn.Module,
    epoch: int,
    step: int,
    train_loss: float | None,
    eval_examples: list[Example],
    config: FinetuneConfig,
    pad_id: int,
) -> dict[str, float]:
    row: dict[str, float] = {"epoch": epoch, "step": step}
    if train_loss is not None:
        row["train_loss"] = train_loss
    if eval_examples:
        result = evaluate(model, eval_examples, config.batch_size, pad_id)
        row |= {"eval_loss": result.loss, "eval_exact_match": result.exact_match}
    return row


def _summary(row: dict[str, float]) -> str:
    parts = [f"epoch {int(row['epoch'])}"]
    parts += [f"{key} {value:.4f}" for key, value in row.items() if key not in ("epoch", "step")]
    return ", ".join(parts)


def _metrics(
    config: FinetuneConfig, history: History, num_train: int, num_eval: int, started: float
) -> dict[str, Any]:
    settings = json.loads(json.dumps(asdict(config), default=str))  # paths as strings
    return {
        "config": settings,
        "train_examples": num_train,
        "eval_examples": num_eval,
        "steps": len(history.step_losses),
        "train_seconds": round(time.perf_counter() - started, 1),
        "epochs": history.epochs,
        "step_losses": history.step_losses,
    }
