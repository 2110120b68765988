"""The words said about a scene: its caption, its questions, its plain-text description."""

from __future__ import annotations

import random
from collections import Counter

from models.scenes.world import COLOURS, POSITIONS, SHAPES, SceneObject

TASKS = ("colour", "shape", "count", "existence", "position", "size")
NUMBERS = ("zero", "one", "two", "three")
PLACE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}


def describe(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape} {PLACE[obj.position]}"


def caption(objects: list[SceneObject]) -> str:
    """Objects left to right: 'A, B and C.' (two: 'A and B.', one: 'A.')."""
    phrases = [describe(obj) for obj in objects]
    if len(phrases) == 1:
        return f"{phrases[0]}."
    return ", ".join(phrases[:-1]) + f" and {phrases[-1]}."


def questions(objects: list[SceneObject], rng: random.Random) -> dict[str, tuple[str, str]]:
    """One unambiguous (question, answer) per task, where the scene allows one."""
    askers = {
        "colour": _ask_colour,
        "shape": _ask_shape,
        "count": _ask_count,
        "existence": _ask_existence,
        "position": _ask_position,
        "size": _ask_size,
    }
    asked = {task: askers[task](objects, rng) for task in TASKS}
    return {task: pair for task, pair in asked.items() if pair is not None}


def _unique(objects: list[SceneObject], key: str) -> list[SceneObject]:
    counts = Counter(getattr(obj, key) for obj in objects)
    return [obj for obj in objects if counts[getattr(obj, key)] == 1]


def _unique_pairs(objects: list[SceneObject]) -> list[SceneObject]:
    counts = Counter((obj.colour, obj.shape) for obj in objects)
    return [obj for obj in objects if counts[obj.colour, obj.shape] == 1]


def _ask_colour(objects: list[SceneObject], rng: random.Random) -> tuple[str, str] | None:
    candidates = _unique(objects, "shape")
    if not candidates:
        return None
    obj = rng.choice(candidates)
    return f"what color is the {obj.shape}?", obj.colour


def _ask_shape(objects: list[SceneObject], rng: random.Random) -> tuple[str, str] | None:
    candidates = _unique(objects, "colour")
    if not candidates:
        return None
    obj = rng.choice(candidates)
    return f"what shape is the {obj.colour} object?", obj.shape


def _ask_count(objects: list[SceneObject], rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        return "how many objects are there?", NUMBERS[len(objects)]
    shape = rng.choice(SHAPES)
    count = sum(obj.shape == shape for obj in objects)
    return f"how many {shape}s are there?", NUMBERS[count]


def _ask_existence(objects: list[SceneObject], rng: random.Random) -> tuple[str, str]:
    present = {(obj.colour, obj.shape) for obj in objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = rng.choice(absent)
    answer = "yes" if (colour, shape) in present else "no"
    return f"is there a {colour} {shape}?", answer


def _ask_position(objects: list[SceneObject], rng: random.Random) -> tuple[str, str] | None:
    candidates = _unique_pairs(objects)
    if not candidates:
        return None
    obj = rng.choice(candidates)
    return f"where is the {obj.colour} {obj.shape}?", obj.position


def _ask_size(objects: list[SceneObject], rng: random.Random) -> tuple[str, str] | None:
    candidates = _unique_pairs(objects)
    if not candidates:
        return None
    obj = rng.choice(candidates)
    return f"what size is the {obj.colour} {obj.shape}?", obj.size


def scene_text(caption_text: str, qa: list[tuple[str, str]]) -> str:
    """The plain-text form used for language pretraining: the caption, then each Q and A."""
    return " ".join([caption_text, *(f"{question} {answer}." for question, answer in qa)])


assert set(PLACE) == set(POSITIONS)
