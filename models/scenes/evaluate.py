"""`python -m models.scenes.evaluate --model DIR [--server URL]`: exact match per task.

Scores captions and every question of held-out scenes (seeds from EVAL_SEED_START, never
used in training), through transformers' reference model or through a running mmgpt server.
`--adapter DIR` applies a LoRA adapter (with peft), `--served-model NAME` asks a server's
adapter by its name; `--tasks place` asks instead the question type the shipped model
never saw (models/scenes/finetune_data.py), the same questions as its held-out JSONL.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.scenes.backends import Backend, Request, ServerBackend, TransformersBackend
from models.scenes.data import CAPTION_TASK
from models.scenes.finetune_data import PLACE_TASK, place_question
from models.scenes.language import TASKS
from models.scenes.sample import sample
from models.scenes.world import EVAL_SEED_START

ALL_TASKS = (CAPTION_TASK, *TASKS)
THRESHOLDS = {CAPTION_TASK: 0.97, PLACE_TASK: 0.95} | dict.fromkeys(TASKS, 0.95)


@dataclass
class TaskScore:
    total: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def place_requests(num_scenes: int) -> list[Request]:
    """The place question of each held-out scene, as the held-out JSONL asks it."""
    requests = []
    for seed in range(EVAL_SEED_START, EVAL_SEED_START + num_scenes):
        scene = sample(seed)
        question, answer = place_question(scene, random.Random(seed))
        requests.append(Request(PLACE_TASK, scene.image, question, answer))
    return requests


def held_out_requests(num_scenes: int) -> list[Request]:
    """The caption and each question of scenes EVAL_SEED_START, EVAL_SEED_START + 1, ..."""
    requests = []
    for seed in range(EVAL_SEED_START, EVAL_SEED_START + num_scenes):
        scene = sample(seed)
        requests.append(Request(CAPTION_TASK, scene.image, None, scene.caption))
        for task, (question, answer) in scene.qa_by_task.items():
            requests.append(Request(task, scene.image, question, answer))
    return requests


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def evaluate(backend: Backend, num_scenes: int, tasks: str = "scenes") -> dict[str, TaskScore]:
    names: tuple[str, ...]
    if tasks == "place":
        requests, names = place_requests(num_scenes), (PLACE_TASK,)
    else:
        requests, names = held_out_requests(num_scenes), ALL_TASKS
    scores = {task: TaskScore() for task in names}
    for request, answer in zip(requests, backend.answer(requests), strict=True):
        score = scores[request.task]
        score.total += 1
        score.correct += normalise(answer) == normalise(request.expected)
    return scores


def below_threshold(scores: dict[str, TaskScore]) -> list[str]:
    return [task for task, score in scores.items() if score.accuracy < THRESHOLDS[task]]


def table(scores: dict[str, TaskScore]) -> str:
    rows = ["| task | questions | exact match | threshold |", "|---|---|---|---|"]
    for task, score in scores.items():
        rows.append(
            f"| {task} | {score.total} | {100 * score.accuracy:.1f}% "
            f"| {100 * THRESHOLDS[task]:.0f}% |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--server", help="a running mmgpt server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--num-scenes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adapter", type=Path, help="a LoRA adapter folder (transformers only)")
    parser.add_argument(
        "--served-model", help="with --server: the model or LoRA adapter to ask (its `model`)"
    )
    parser.add_argument(
        "--tasks", choices=["scenes", "place"], default="scenes",
        help="the model's own tasks, or the place questions it was never trained on",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    make_backend: Callable[[], Backend]
    if args.server:
        make_backend = lambda: ServerBackend(  # noqa: E731
            args.server, concurrency=args.batch_size, model=args.served_model
        )
    else:
        make_backend = lambda: TransformersBackend(  # noqa: E731
            args.model, args.batch_size, args.threads, args.adapter
        )
    scores = evaluate(make_backend(), args.num_scenes, args.tasks)
    where = args.server or f"transformers, {args.model}"
    where += f", model {args.served_model}" if args.served_model and args.server else ""
    where += f", adapter {args.adapter}" if args.adapter and not args.server else ""
    print(f"{args.num_scenes} held-out scenes (seeds from {EVAL_SEED_START}), {where}")
    print(table(scores))
    failing = below_threshold(scores)
    if failing:
        print(f"below threshold: {', '.join(failing)}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
