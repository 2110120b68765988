"""A concept the shipped model never saw, as OpenAI fine-tuning JSONL for `mmgpt finetune`.

The base model answers questions that name an object by its shape or colour; this task
names it by its place instead: `what color is the object on the right?` -> `blue`,
`what shape is the object in the middle?` -> `circle`, asked only where that column
holds an object. Every word is in the model's vocabulary. Training scenes come from the
training seed range, evaluation scenes (place questions only) from the held-out range.
A share of the training lines (`--rehearse`) asks the captions and questions the model
already answers: an adapter trained on the new questions alone unlearns them.

    python -m models.scenes.finetune_data --out DIR [--train 2000] [--eval 300] [--rehearse 0.5]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from models.scenes.language import PLACE
from models.scenes.sample import sample
from models.scenes.tokenizer import CAPTION_PROMPT
from models.scenes.world import EVAL_SEED_START, Scene

PLACE_TASK = "place"
TRAIN_SEED_START = 5_000_000  # inside the training range, away from the recipe's first seeds
ATTRIBUTES = {"color": "colour", "shape": "shape"}  # the word asked -> the object's field
CAPTION_SHARE = 0.3


def place_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """One question naming an object by its column, and its answer."""
    obj = rng.choice(scene.objects)
    word = rng.choice(sorted(ATTRIBUTES))
    return f"what {word} is the object {PLACE[obj.position]}?", getattr(obj, ATTRIBUTES[word])


def own_task(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A caption request (30%, as the recipe has it) or one of the scene's own questions."""
    if rng.random() < CAPTION_SHARE or not scene.qa:
        return CAPTION_PROMPT, scene.caption
    return rng.choice(scene.qa)


def record(
    scene: Scene, image_path: str, rng: random.Random, rehearse: float = 0.0
) -> dict[str, object]:
    """One conversation; with probability `rehearse` one of the tasks the model knows."""
    if rehearse and rng.random() < rehearse:
        question, answer = own_task(scene, rng)
    else:
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


def write_split(out: Path, name: str, seeds: range, rehearse: float = 0.0) -> Path:
    """`name`.jsonl with its images as PNG files under images/, named by seed."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    with path.open("w") as lines:
        for seed in seeds:
            scene = sample(seed)
            image_path = f"images/{seed}.png"
            scene.image.save(out / image_path)
            rng = random.Random(seed)
            lines.write(json.dumps(record(scene, image_path, rng, rehearse)) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=2000, help="training examples")
    parser.add_argument("--eval", type=int, default=300, help="held-out examples")
    parser.add_argument(
        "--rehearse", type=float, default=0.5,
        help="share of training lines that ask the tasks the model already knows",
    )  # fmt: skip
    args = parser.parse_args(argv)
    train_seeds = range(TRAIN_SEED_START, TRAIN_SEED_START + args.train)
    write_split(args.out, "train", train_seeds, args.rehearse)
    write_split(args.out, "eval", range(EVAL_SEED_START, EVAL_SEED_START + args.eval))
    print(args.out)


if __name__ == "__main__":
    main()
