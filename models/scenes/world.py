"""The closed world the scenes are drawn from: its words and how a scene is sampled."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple")
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")  # one column slot each, ordered left to right
MAX_OBJECTS = 3

# Training draws seeds from [0, TRAIN_SEED_END); evaluation from EVAL_SEED_START upwards.
TRAIN_SEED_END = 10_000_000
EVAL_SEED_START = 1_000_000_000


Box = tuple[int, int, int, int]  # left, top, right, bottom (exclusive), in pixels


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str  # the column slot it sits in; one object per slot

    @property
    def slot(self) -> int:
        return POSITIONS.index(self.position)


@dataclass
class Scene:
    seed: int
    objects: list[SceneObject]  # ordered left to right
    image: Image.Image
    boxes: list[Box]  # per object, in the order of `objects`
    caption: str
    qa_by_task: dict[str, tuple[str, str]] = field(default_factory=dict)  # task -> (q, a)
    text: str = ""

    @property
    def qa(self) -> list[tuple[str, str]]:
        """The (question, answer) pairs, one per task that this scene can ask unambiguously."""
        return list(self.qa_by_task.values())


def sample_objects(rng: random.Random) -> list[SceneObject]:
    """1 to MAX_OBJECTS objects in distinct column slots, ordered left to right."""
    count = rng.randint(1, MAX_OBJECTS)
    slots = sorted(rng.sample(range(len(POSITIONS)), count))
    return [
        SceneObject(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), POSITIONS[slot])
        for slot in slots
    ]
