"""The vision tower over a step's new images: one packed call against one call per image.

Runs on a tiny random Qwen2.5-VL (the tests' checkpoint: window attention, 4-pixel
patches merged 2x2) with images of mixed sizes, one torch thread, and prints the
median of each way, alternating, twice.

    python -m bench.vision_packing --images 16 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models import load_model
from models.processors import image_features

SIZES = [(16, 16), (40, 24), (32, 32), (56, 40), (64, 64), (24, 48), (48, 48), (16, 40)]


def median_ms(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    from tests.engine.qwen_vl_reference import picture
    from tests.qwen_vl_checkpoints import make_tiny_qwen_vl

    torch.set_num_threads(1)
    folder = make_tiny_qwen_vl(tempfile.mkdtemp(), family="qwen2_5_vl")
    loaded = load_model(Path(folder))
    model = loaded.model
    images = []
    for index in range(args.images):
        height, width = SIZES[index % len(SIZES)]
        features = image_features(picture(height, width, index), loaded.image_processor)
        tensors = {"pixel_values": features.pixel_values, **features.extra}
        images.append({name: torch.from_numpy(array) for name, array in tensors.items()})
    ways: dict[str, Callable[[], object]] = {
        "packed, one call": lambda: model.encode_image_batch(images),
        "one call per image": lambda: [model.encode_image_batch([image]) for image in images],
    }
    results: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(2):
        for name, run in ways.items():
            results[name].append(median_ms(run, args.repeats))
    tokens = sum(model.image_tokens(image) for image in images)
    print(f"{len(images)} images, {tokens} image tokens, median ms per step of images")
    print("| | run 1 | run 2 |\n|---|---|---|")
    for name, times in results.items():
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


if __name__ == "__main__":
    main()
