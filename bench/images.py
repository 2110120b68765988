"""Images and questions for the image workloads.

`scenes` draws from the shipped model's synthetic world (models.scenes, imported
only when used); `synthetic` draws simple shapes with PIL, for checkpoints that
were not trained on scenes and for machines without the scenes recipe; `mixed`
draws the same shapes on images of eight sizes and aspect ratios, for models that
read images at their native resolution.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from typing import Protocol

from PIL import Image, ImageDraw

CAPTION_PROMPT = "Describe the image."
_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220)}
_SHAPES = ("circle", "square")
_QUESTIONS = ("What colour is the shape?", "What shape is in the image?", "Where is the shape?")
# (width, height): square, landscape and portrait, multiples of 28 (a Qwen-VL token is 28x28
# pixels), from 64 to 256 Qwen-VL tokens
MIXED_SIZES = (
    (224, 224),
    (448, 336),
    (336, 448),
    (392, 224),
    (224, 392),
    (448, 448),
    (280, 280),
    (504, 280),
)


class ImageSource(Protocol):
    def image_png(self, index: int) -> bytes: ...

    def question(self, index: int, variant: int = 0) -> str: ...


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class SyntheticImages:
    """One coloured shape on a grey background per index; deterministic in (seed, index).
    Image `index` has the size `sizes[index % len(sizes)]` (width, height)."""

    def __init__(self, seed: int = 0, sizes: Sequence[tuple[int, int]] = ((64, 64),)) -> None:
        self.seed = seed
        self.sizes = tuple(sizes)

    def image_png(self, index: int) -> bytes:
        rng = random.Random(self.seed * 1_000_003 + index)
        width, height = self.sizes[index % len(self.sizes)]
        image = Image.new("RGB", (width, height), (128, 128, 128))
        side = rng.randint(min(width, height) // 5, min(width, height) // 2)
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        box = (left, top, left + side, top + side)
        colour = _COLOURS[rng.choice(sorted(_COLOURS))]
        draw = ImageDraw.Draw(image)
        if rng.choice(_SHAPES) == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
        return png_bytes(image)

    def question(self, index: int, variant: int = 0) -> str:
        first = random.Random(self.seed * 7919 + index).randrange(len(_QUESTIONS))
        return _QUESTIONS[(first + variant) % len(_QUESTIONS)]


# Scenes per workload seed: seeds 0, 1, 2, ... draw disjoint runs of scenes, so that a
# round with a new seed meets no image an earlier round left in the server's image cache.
SCENES_PER_SEED = 100_000


class SceneImages:
    """Held-out scenes from models.scenes: `.image` and `.qa`, a list of (question, answer)."""

    def __init__(self, seed: int = 0) -> None:
        from models import scenes  # the recipe pulls in its own dependencies; import on use only

        self._sample = scenes.sample
        self.first_seed = scenes.EVAL_SEED_START + seed * SCENES_PER_SEED

    def image_png(self, index: int) -> bytes:
        return png_bytes(self._sample(self.first_seed + index).image)

    def question(self, index: int, variant: int = 0) -> str:
        pairs = self._sample(self.first_seed + index).qa
        return pairs[(index + variant) % len(pairs)][0] if pairs else CAPTION_PROMPT


def image_source(name: str, seed: int) -> ImageSource:
    if name == "scenes":
        return SceneImages(seed)
    if name == "synthetic":
        return SyntheticImages(seed)
    if name == "mixed":
        return SyntheticImages(seed, MIXED_SIZES)
    raise ValueError(f"unknown image source {name!r} (scenes, synthetic or mixed)")
