"""`sample(seed)`: one deterministic scene per seed."""

from __future__ import annotations

import random

from models.scenes.language import caption, questions, scene_text
from models.scenes.render import render
from models.scenes.world import Scene, sample_objects


def sample(seed: int) -> Scene:
    """The scene for `seed`: the same image, caption and questions on every machine."""
    rng = random.Random(seed)
    objects = sample_objects(rng)
    image, boxes = render(objects, rng)
    text = caption(objects)
    qa_by_task = questions(objects, rng)
    return Scene(
        seed=seed,
        objects=objects,
        image=image,
        boxes=boxes,
        caption=text,
        qa_by_task=qa_by_task,
        text=scene_text(text, list(qa_by_task.values())),
    )
