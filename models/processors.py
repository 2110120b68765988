"""Image processors per family: an image -> its processor's arrays and its token count.

The checkpoint's own transformers image processor makes the arrays (in its PIL/numpy
form, so no torchvision is needed). A fixed-size family (LLaVA) gives one
[3, H, W] array and the model's fixed token count; a native-resolution family
(Qwen-VL) gives the image's patches [patches, C*T*P*P] and its grid (t, h, w),
and becomes t*h*w / merge² tokens.

`detail` (OpenAI's `image_url.detail`) picks the pixel bounds a native-resolution
processor resizes into: "high" and "auto" keep the processor's own
(`min_pixels`..`max_pixels`); "low" caps the image at LOW_DETAIL_PIXELS (512x512,
OpenAI's low-detail size), never below the processor's minimum. A fixed-size
processor reads every image at its one size whatever the detail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

DETAILS = ("auto", "low", "high")
LOW_DETAIL_PIXELS = 512 * 512


@dataclass(frozen=True)
class ImageFeatures:
    pixel_values: np.ndarray  # float32 [3, H, W], or [patches, C*T*P*P]
    num_tokens: int  # 0: the model's fixed image_seq_length
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. image_grid_thw [3]
    # the text the image's placeholder becomes where its family writes more than image tokens
    # (SmolVLM's tile tags, models/tile_processor.py); "": num_tokens image tokens
    prompt_text: str = ""


def pixel_bounds(image_processor: Any, detail: str) -> dict[str, int] | None:
    """The `size` a native-resolution processor resizes into for `detail`; None: its own."""
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {', '.join(DETAILS)}, not {detail!r}")
    size = getattr(image_processor, "size", None)
    if detail != "low" or not is_native_resolution(image_processor) or not size:
        return None
    low = max(int(size["shortest_edge"]), min(int(size["longest_edge"]), LOW_DETAIL_PIXELS))
    return {"shortest_edge": int(size["shortest_edge"]), "longest_edge": low}


def is_native_resolution(image_processor: Any) -> bool:
    return "image_grid_thw" in getattr(image_processor, "model_input_names", ())


def image_tokens_for_size(image_processor: Any, width: int, height: int, detail: str) -> int:
    """The tokens an image of this size becomes, from its size alone (its header, before
    any pixel is decoded), as the processor's own resize rule counts them; 0 for a
    fixed-size processor (the model's fixed count)."""
    bounds = pixel_bounds(image_processor, detail)  # first: refuses an unknown detail for all
    if hasattr(image_processor, "tokens_for_size"):  # a family that tiles (tile_processor.py)
        return int(image_processor.tokens_for_size(width, height, detail))
    if not is_native_resolution(image_processor):
        return 0
    kwargs: dict[str, Any] = {} if bounds is None else {"size": bounds}
    patches = image_processor.get_number_of_image_patches(height, width, kwargs)
    return int(patches) // int(image_processor.merge_size) ** 2


def image_features(image: Any, image_processor: Any, detail: str = "auto") -> ImageFeatures:
    """A PIL RGB image -> the arrays its family's vision tower takes and its token count."""
    bounds = pixel_bounds(image_processor, detail)
    if hasattr(image_processor, "features_of"):  # a family that tiles (tile_processor.py)
        return image_processor.features_of(image, detail)
    kwargs: dict[str, Any] = {} if bounds is None else {"size": bounds}
    batch = image_processor(images=[image], return_tensors="np", **kwargs)
    pixels = np.ascontiguousarray(np.asarray(batch["pixel_values"], dtype=np.float32))
    if not is_native_resolution(image_processor):
        return ImageFeatures(pixels[0], 0)  # [3, H, W]
    grid = np.asarray(batch["image_grid_thw"], dtype=np.int64).reshape(3)
    num_tokens = int(grid.prod()) // int(image_processor.merge_size) ** 2
    return ImageFeatures(pixels, num_tokens, {"image_grid_thw": grid})


def warm_up_features(image_processor: Any) -> ImageFeatures | None:
    """A blank image of a native-resolution processor's smallest size, through that
    processor: what a start-up warm-up sends through the packed vision path. None for a
    fixed-size processor, whose warm-up images are made at its one size."""
    if not is_native_resolution(image_processor):
        return None
    side = math.isqrt(int(image_processor.size["shortest_edge"]) - 1) + 1  # at least min_pixels
    return image_features(Image.new("RGB", (side, side), (128, 128, 128)), image_processor)
