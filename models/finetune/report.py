"""What a run leaves beside its adapter: metrics.json and loss_curve.png.

The curve is drawn with Pillow (already a dependency): training loss per step, and the
evaluation loss per epoch as dots, on one shared axis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

METRICS_FILE = "metrics.json"
CURVE_FILE = "loss_curve.png"
WIDTH, HEIGHT, MARGIN = 640, 400, 48
TRAIN_COLOUR, EVAL_COLOUR, AXIS_COLOUR = (31, 119, 180), (214, 39, 40), (60, 60, 60)


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def draw_loss_curve(
    out: Path, step_losses: list[float], eval_points: list[tuple[int, float]]
) -> Path:
    """`eval_points`: (step, loss) pairs, step 0 being before training."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    values = step_losses + [loss for _, loss in eval_points] or [0.0]
    top, last_step = max(values) * 1.05 or 1.0, max(len(step_losses), 1)

    def at(step: float, loss: float) -> tuple[float, float]:
        x = MARGIN + (WIDTH - 2 * MARGIN) * step / last_step
        return x, HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * max(loss, 0.0) / top

    draw.line([at(0, top), at(0, 0), at(last_step, 0)], fill=AXIS_COLOUR, width=1)
    draw.text((MARGIN, 12), "loss per step (line), eval loss per epoch (dots)", fill=AXIS_COLOUR)
    draw.text((4, MARGIN - 6), f"{top:.2f}", fill=AXIS_COLOUR)
    draw.text((WIDTH - MARGIN, HEIGHT - MARGIN + 6), f"{last_step}", fill=AXIS_COLOUR)
    if len(step_losses) > 1:
        draw.line(
            [at(i + 1, loss) for i, loss in enumerate(step_losses)], fill=TRAIN_COLOUR, width=2
        )
    for step, loss in eval_points:
        x, y = at(step, loss)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=EVAL_COLOUR)
    path = out / CURVE_FILE
    image.save(path)
    return path
