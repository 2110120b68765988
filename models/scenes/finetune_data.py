"""A concept the shipped model never saw, as OpenAI fine-tuning JSONL for `mmgpt finetune`.

The base model answers questions that name an object by its shape or colour; this task
names it by its place instead: `what color is the object on the right?` -> `blue`,
`what shape is the object in the middle?` -> `circle`, asked only where that column
holds an object. Every word is in the model's vocabulary. Training scenes come from the
training seed range, evaluation scenes from the held-out range.

    python -m models.scenes.finetune_data --out DIR [--train 2000] [--eval 300]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from models.scenes.language import PLACE
from models.scenes.sample import sample
from models.scenes.world import EVAL_SEED_START, Scene

PLACE_TASK = "place"
TRAIN_SEED_START = 5_000_000  # inside the training range, away from the recipe's first seeds
ATTRIBUTES = {"color": "colour", "shape": "shape"}  # the word asked -> the object's field


def place_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """One question naming an object by its column, and its answer."""
    obj = rng.choice(scene.objects)
    word = rng.choice(sorted(ATTRIBUTES))
    return f"what {word} is the object {PLACE[obj.position]}?", getattr(obj, ATTRIBUTES[word])


def record(scene: Scene, image_path: str, rng: random.Random) -> dict[str, object]:
    question, answer = place_question(scene, rng)
    user = [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": image_path}},
    ]
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def write_split(out: Path, name: str, seeds: range) -> Path:
    """`name`.jsonl with its images as PNG files under images/, named by seed."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    with path.open("w") as lines:
        for seed in seeds:
            scene = sample(seed)
            image_path = f"images/{seed}.png"
            scene.image.save(out / image_path)
            rng = random.Random(seed)
            lines.write(json.dumps(record(scene, image_path, rng)) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=2000, help="training examples")
    parser.add_argument("--eval", type=int, default=300, help="held-out examples")
    args = parser.parse_args(argv)
    write_split(args.out, "train", range(TRAIN_SEED_START, TRAIN_SEED_START + args.train))
    write_split(args.out, "eval", range(EVAL_SEED_START, EVAL_SEED_START + args.eval))
    print(args.out)


if __name__ == "__main__":
    main()
