"""Qwen-VL (2, 2.5 and 3) at the model level: logits of our paged model equal
transformers' (1e-4, float32) for two images of different shapes in one prompt, in one
step and chunked through an image; M-RoPE positions equal transformers' get_rope_index;
loading is strict."""

from __future__ import annotations

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
from tests.models.paged import PagedSession, relative_error
from tests.qwen_vl_checkpoints import (
    FAMILIES,
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    make_tiny_qwen_vl,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen_vl(tmp_path_factory.mktemp(request.param), family=request.param)


def two_image_prompt(loaded: LoadedModel) -> tuple[list[int], list[int], list[dict]]:
    """Token ids with a wide and a tall image, the images' first positions and tensors."""
    tokenizer = loaded.tokenizer
    start, end, pad = (
        tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END, IMAGE_PAD)
    )
    features = [
        image_features(picture(h, w, i), loaded.image_processor)
        for i, (h, w) in enumerate([(30, 50), (44, 20)])
    ]
    ids, starts = [20, 21, 22], []
    for feature in features:
        ids.append(start)
        starts.append(len(ids))
        ids += [pad] * feature.num_tokens + [end, 23, 24]
    tensors = [{"pixel_values": f.pixel_values, **f.extra} for f in features]
    return ids, starts, tensors


def reference_logits(folder: Path, ids: list[int], tensors: list[dict], pad: int) -> torch.Tensor:
    reference = AutoModelForImageTextToText.from_pretrained(folder).eval()
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        return reference(
            input_ids=input_ids,
            pixel_values=torch.from_numpy(np.concatenate([t["pixel_values"] for t in tensors])),
            image_grid_thw=torch.from_numpy(np.stack([t["image_grid_thw"] for t in tensors])),
            mm_token_type_ids=input_ids.eq(pad).int(),
        ).logits[0]


@pytest.mark.parametrize("chunks", [[1.0], [0.3, 0.7]])
def test_logits_equal_transformers(folder: Path, chunks: list[float]) -> None:
    assert_logits_equal_transformers(folder, chunks)


def test_a_tied_qwen3_vl_equals_transformers(tmp_path: Path) -> None:
    """Qwen3-VL-2B and -4B tie the output layer to the embeddings."""
    folder = make_tiny_qwen_vl(tmp_path, family="qwen3_vl", tied=True)
    decoder = load_model(folder).model.decoder  # type: ignore[attr-defined]
    assert decoder.lm_head is decoder.embed_tokens
    assert_logits_equal_transformers(folder, [1.0])


def assert_logits_equal_transformers(folder: Path, chunks: list[float]) -> None:
    loaded = load_model(folder)
    model = loaded.model
    ids, starts, tensors = two_image_prompt(loaded)
    pad = loaded.info.image_token_id
    expected = reference_logits(folder, ids, tensors, pad)
    positions, _ = model.prompt_positions(len(ids), starts, tensors)
    embeds = torch.cat(
        model.encode_image_batch(
            [{k: torch.from_numpy(np.asarray(v)) for k, v in t.items()} for t in tensors]
        )
    )
    session, done, used = PagedSession(model), 0, 0
    for share in chunks:
        end = len(ids) if share == chunks[-1] else int(len(ids) * share)
        chunk = ids[done:end]
        attn_inputs, _ = session.attention_inputs([(0, chunk)])
        rows = chunk.count(pad)
        hidden = model.forward(
            torch.tensor(chunk),
            torch.from_numpy(positions[:, done:end].copy()),
            attn_inputs,
            session.cache,
            embeds[used : used + rows] if rows else None,
        )
        session.lengths[0] = end
        assert relative_error(model.compute_logits(hidden), expected[done:end]) < TOLERANCE
        done, used = end, used + rows


def test_positions_equal_get_rope_index(folder: Path) -> None:
    loaded = load_model(folder)
    ids, starts, tensors = two_image_prompt(loaded)
    reference = AutoModelForImageTextToText.from_pretrained(folder).eval()
    input_ids = torch.tensor([ids])
    expected, delta = reference.model.get_rope_index(
        input_ids,
        input_ids.eq(loaded.info.image_token_id).int(),
        image_grid_thw=torch.from_numpy(np.stack([t["image_grid_thw"] for t in tensors])),
    )
    positions, offset = loaded.model.prompt_positions(len(ids), starts, tensors)
    np.testing.assert_array_equal(positions, expected[:, 0].numpy())
    assert offset == int(delta)


def test_a_vision_tensor_too_many_is_refused(folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in folder.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    weights = load_file(copy / "model.safetensors")
    weights["model.visual.extra.weight"] = torch.zeros(2)
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="unexpected"):
        load_model(copy)
