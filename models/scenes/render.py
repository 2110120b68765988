"""Drawing a scene's objects onto a plain background with Pillow."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from models.scenes.world import IMAGE_SIZE, POSITIONS, Box, SceneObject

BACKGROUND = (245, 245, 245)
RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
}
SIDE = {"small": 10, "large": 18}  # bounding-box side in pixels


def render(objects: list[SceneObject], rng: random.Random) -> tuple[Image.Image, list[Box]]:
    """Draw each object at a jittered centre inside its column slot; returns the image and
    each object's bounding box."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    boxes = []
    for obj in objects:
        left, top = _top_left(obj, rng)
        _draw_shape(draw, obj, left, top)
        side = SIDE[obj.size]
        boxes.append((left, top, left + side, top + side))
    return image, boxes


def _top_left(obj: SceneObject, rng: random.Random) -> tuple[int, int]:
    column_width = IMAGE_SIZE // len(POSITIONS)
    side = SIDE[obj.size]
    column_start = obj.slot * column_width + (IMAGE_SIZE - column_width * len(POSITIONS)) // 2
    left = column_start + rng.randint(0, column_width - side)
    top = rng.randint(4, IMAGE_SIZE - 4 - side)
    return left, top


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, left: int, top: int) -> None:
    side = SIDE[obj.size]
    box = (left, top, left + side - 1, top + side - 1)
    fill = RGB[obj.colour]
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        apex = (left + (side - 1) / 2, top)
        draw.polygon([apex, (left, top + side - 1), (left + side - 1, top + side - 1)], fill=fill)
