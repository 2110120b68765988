"""models/processors.py: token counts per image (from the pixels, and from the size alone,
as the header gives it) and the `detail` -> pixel bounds mapping."""

from __future__ import annotations

import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from models.processors import (
    LOW_DETAIL_PIXELS,
    image_features,
    image_tokens_for_size,
    pixel_bounds,
)
from tests.engine.qwen_vl_reference import picture
from tests.qwen_vl_checkpoints import MERGE, PATCH, image_processor

TOKEN_SIDE = PATCH * MERGE


def large_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, min_pixels=4 * TOKEN_SIDE**2, max_pixels=1024 * 1024
    )


def test_low_caps_pixels_high_and_auto_keep_the_processors_bounds() -> None:
    processor = large_processor()
    assert pixel_bounds(processor, "auto") is None and pixel_bounds(processor, "high") is None
    assert pixel_bounds(processor, "low") == {
        "shortest_edge": 4 * TOKEN_SIDE**2,
        "longest_edge": LOW_DETAIL_PIXELS,
    }
    tight = image_processor()  # its max is below the low-detail cap: low changes nothing
    assert pixel_bounds(tight, "low") == {"shortest_edge": 256, "longest_edge": 4096}
    with pytest.raises(ValueError, match="detail"):
        pixel_bounds(processor, "ultra")


def test_a_large_image_at_low_detail_becomes_fewer_tokens() -> None:
    image = picture(640, 800, seed=0)
    high = image_features(image, large_processor(), "high")
    low = image_features(image, large_processor(), "low")
    assert high.num_tokens == 640 * 800 // TOKEN_SIDE**2
    assert low.num_tokens * TOKEN_SIDE**2 <= LOW_DETAIL_PIXELS < high.num_tokens * TOKEN_SIDE**2
    assert low.pixel_values.shape[0] == low.num_tokens * MERGE**2  # patches per merged token


@pytest.mark.parametrize("detail", ["auto", "low", "high"])
def test_the_count_from_the_size_alone_equals_the_processed_images(detail: str) -> None:
    for processor in (image_processor(), large_processor()):
        for height, width in [(30, 50), (44, 20), (9, 12), (90, 70), (640, 800), (1000, 30)]:
            expected = image_features(picture(height, width, seed=1), processor, detail)
            assert image_tokens_for_size(processor, width, height, detail) == expected.num_tokens
    with pytest.raises(ValueError, match="detail"):
        image_tokens_for_size(large_processor(), 32, 32, "ultra")
