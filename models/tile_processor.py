"""SmolVLM / Idefics3 images: tiles plus a global image, and the prompt text they become.

transformers' PIL image processor (no torchvision) resizes an image so that its longer
side is the processor's `size`, rounds both sides up to whole tiles, cuts the tiles
row by row and appends the whole image squeezed into one tile. The family's processor
then writes, for the k-th image of a prompt, the tiles' tokens between their row/column
tags (`<fake_token_around_image><row_1_col_1><image>...`), a newline after each row and
the global image last (`<global-img>`); `prompt_text` writes exactly that. The
processor's pixel mask is left out: one image's tiles all have the tile's size, so it
masks nothing (it pads only batches of images with different tile counts).

`detail`: "low" reads the image as one tile (the processor without splitting: the
global image alone, one tile's tokens); "auto" and "high" split as the processor does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers.models.smolvlm.image_processing_pil_smolvlm import get_resize_output_image_size

from models.checkpoint import PROCESSOR_CONFIG_FILE, read_json
from models.errors import ModelLoadError
from models.processors import ImageFeatures

IMAGE_TOKEN, FAKE_TOKEN, GLOBAL_TOKEN = "<image>", "<fake_token_around_image>", "<global-img>"


@dataclass(frozen=True)
class TiledImageProcessor:
    """The checkpoint's image processor and what the family's processor adds to it."""

    image_processor: Any  # SmolVLMImageProcessorPil / Idefics3ImageProcessorPil
    tokens_per_tile: int
    image_token: str = IMAGE_TOKEN
    fake_token: str = FAKE_TOKEN
    global_token: str = GLOBAL_TOKEN

    def features_of(self, image: Any, detail: str) -> ImageFeatures:
        """A PIL RGB image -> its tiles [tiles, 3, S, S], token count and prompt text."""
        split = bool(self.image_processor.do_image_splitting) and detail != "low"
        batch = self.image_processor(
            images=[image], return_tensors="np", return_row_col_info=True, do_image_splitting=split
        )
        tiles = np.ascontiguousarray(np.asarray(batch["pixel_values"][0], dtype=np.float32))
        rows, cols = int(batch["rows"][0][0]), int(batch["cols"][0][0])
        text = self.prompt_text(rows, cols)
        return ImageFeatures(tiles, len(tiles) * self.tokens_per_tile, prompt_text=text)

    def tokens_for_size(self, width: int, height: int, detail: str) -> int:
        """The tokens `features_of` gives an image of this size, from its size alone (the
        processor's resize, round-up-to-tiles and split steps, on sizes instead of pixels)."""
        if not (self.image_processor.do_image_splitting and detail != "low"):
            return self.tokens_per_tile
        tile = int(self.image_processor.max_image_size["longest_edge"])
        longest = int(self.image_processor.size["longest_edge"])
        blank = np.empty((0, height, width))  # the resize rule reads only the shape
        height, width = get_resize_output_image_size(blank, resolution_max_side=longest)
        rows, cols = _tile_grid(height, width, tile)
        tiles = 1 if rows == cols == 0 else rows * cols + 1
        return tiles * self.tokens_per_tile

    def prompt_text(self, rows: int, cols: int) -> str:
        """What the image's placeholder becomes: rows x cols tiles, then the global image."""
        tile_tokens = self.image_token * self.tokens_per_tile
        global_image = f"{self.fake_token}{self.global_token}{tile_tokens}{self.fake_token}"
        if rows == 0 and cols == 0:
            return global_image
        lines = [
            "".join(f"{self.fake_token}<row_{r}_col_{c}>{tile_tokens}" for c in range(1, cols + 1))
            for r in range(1, rows + 1)
        ]
        return "".join(line + "\n" for line in lines) + "\n" + global_image


def _tile_grid(height: int, width: int, tile: int) -> tuple[int, int]:
    """Rows and columns of tiles after the processor rounds both sides up to whole tiles
    (keeping the aspect ratio on the way, as its resize_for_vision_encoder does); 0 x 0 when
    the image fits one tile and is not split."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    if height > tile or width > tile:
        return height // tile, width // tile
    return 0, 0


def tiled_image_processor(
    image_processor: Any,
    folder: Path,
    tokenizer: Any,
    tokens_per_tile: int,
    image_token_id: int | None,
) -> TiledImageProcessor:
    """The family's processor for a loaded checkpoint; refuses one whose processor settings or
    tokenizer disagree with the model."""
    processor_file = folder / PROCESSOR_CONFIG_FILE
    stated = read_json(processor_file).get("image_seq_len") if processor_file.is_file() else None
    if stated is not None and int(stated) != tokens_per_tile:
        problem = f"image_seq_len is {stated} but the model makes {tokens_per_tile} tokens a tile"
        raise ModelLoadError(processor_file, problem)
    processor = TiledImageProcessor(
        image_processor,
        tokens_per_tile,
        getattr(tokenizer, "image_token", None) or IMAGE_TOKEN,
        getattr(tokenizer, "fake_image_token", None) or FAKE_TOKEN,
        getattr(tokenizer, "global_image_token", None) or GLOBAL_TOKEN,
    )
    if tokenizer.convert_tokens_to_ids(processor.image_token) != image_token_id:
        problem = f"the tokenizer's {processor.image_token} is not image_token_id {image_token_id}"
        raise ModelLoadError(folder, problem)
    return processor
