"""Gemma 3 with images at the model level: logits of our paged model equal transformers'
(1e-4, float32, given the processor's token_type_ids) for two images in one prompt beside
a text prompt, in one step and in chunks that keep each image whole; loading is strict."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from models import ModelLoadError, load_model
from models.base import LoadedModel
from models.processors import image_features
from tests.engine.qwen_vl_reference import picture
from tests.gemma3_checkpoints import SLIDING_WINDOW, make_tiny_gemma3_vl
from tests.models.paged import PagedSession, relative_error

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gemma3_vl(tmp_path_factory.mktemp("gemma3-vl"))


@pytest.fixture(scope="module")
def loaded(folder: Path) -> LoadedModel:
    return load_model(folder)


def image_prompt(loaded: LoadedModel) -> tuple[list[int], torch.Tensor]:
    """Text, an image, text, a second image, text; and the two images' pixels."""
    info = loaded.info
    begin, end = loaded.model.begin_image_id, loaded.model.end_image_id  # type: ignore[attr-defined]
    image = [begin, *[info.image_token_id] * info.image_seq_length, end]
    ids = [1, 20, 21, 22, *image, 23, 24, *image, *range(30, 30 + 2 * SLIDING_WINDOW)]
    pixels = [image_features(picture(32, 40, seed), loaded.image_processor) for seed in (1, 2)]
    return ids, torch.stack([torch.from_numpy(p.pixel_values) for p in pixels])


@torch.no_grad()
def reference_logits(
    folder: Path, ids: list[int], pixels: torch.Tensor | None, image_id: int
) -> torch.Tensor:
    reference = AutoModelForImageTextToText.from_pretrained(folder).eval()
    input_ids = torch.tensor([ids])
    if pixels is None:
        return reference(input_ids=input_ids).logits[0]
    kinds = input_ids.eq(image_id).long()
    return reference(input_ids=input_ids, pixel_values=pixels, token_type_ids=kinds).logits[0]


@pytest.mark.parametrize("cuts", [[], [4, 22, 42]])  # one step; chunks between the images
def test_logits_equal_transformers(folder: Path, loaded: LoadedModel, cuts: list[int]) -> None:
    model, image_id = loaded.model, loaded.info.image_token_id
    ids, pixels = image_prompt(loaded)
    text = [1, *range(40, 40 + 3 * SLIDING_WINDOW)]
    expected = reference_logits(folder, ids, pixels, image_id)
    expected_text = reference_logits(folder, text, None, image_id)
    embeds = torch.cat(list(model.encode_images(pixels)))  # [2 * image tokens, hidden]
    session, used = PagedSession(model), 0
    bounds = [0, *cuts, len(ids)]
    for step, (start, end) in enumerate(itertools.pairwise(bounds)):
        chunk = ids[start:end]
        rows = chunk.count(image_id)
        work = [(0, chunk), (1, text)] if step == 0 else [(0, chunk)]
        hidden = session.step(work, embeds[used : used + rows] if rows else None)
        assert relative_error(model.compute_logits(hidden[0]), expected[start:end]) < TOLERANCE
        if step == 0:
            assert relative_error(model.compute_logits(hidden[1]), expected_text) < TOLERANCE
        used += rows


def test_a_chunk_after_a_prefix_hit_inside_an_image(folder: Path, loaded: LoadedModel) -> None:
    """Blocks computed with the whole prompt, shared up to the middle of the first image."""
    model, image_id = loaded.model, loaded.info.image_token_id
    ids, pixels = image_prompt(loaded)
    expected = reference_logits(folder, ids, pixels, image_id)
    embeds = torch.cat(list(model.encode_images(pixels)))
    session = PagedSession(model)
    session.step([(0, ids)], embeds)
    cached = 12  # three blocks of 4: the first image starts at 5
    session.blocks[1], session.lengths[1] = session.blocks[0][: cached // 4], cached
    rest = ids[cached:]
    (hidden,) = session.step([(1, rest)], embeds[ids[:cached].count(image_id) :])
    assert relative_error(model.compute_logits(hidden), expected[cached:]) < TOLERANCE


def test_pan_and_scan_settings_still_give_one_whole_image(loaded: LoadedModel) -> None:
    wide = picture(40, 400, seed=3)  # wide enough for crops
    processor = loaded.image_processor
    plain = image_features(wide, processor)
    pan_and_scan = {
        "do_pan_and_scan": True,
        "pan_and_scan_min_crop_size": 16,
        "pan_and_scan_max_num_crops": 4,
        "pan_and_scan_min_ratio_to_activate": 1.2,
    }
    asking = type(processor)(**(processor.to_dict() | pan_and_scan))
    assert asking(images=[wide], return_tensors="np")["pixel_values"].shape[0] > 1
    np.testing.assert_array_equal(image_features(wide, asking).pixel_values, plain.pixel_values)


def test_a_vision_tensor_too_many_is_refused(folder: Path, tmp_path: Path) -> None:
    weights_file = Path(shutil.copytree(folder, tmp_path / "copy")) / "model.safetensors"
    extra = load_file(weights_file) | {"vision_tower.vision_model.extra.weight": torch.zeros(2)}
    save_file(extra, weights_file, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="unexpected vision tower tensors"):
        load_model(weights_file.parent)
