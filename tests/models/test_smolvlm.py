"""SmolVLM / Idefics3 at the model level: logits of our paged model equal transformers'
(1e-4, float32) for a prompt with two images of different tile grids, in one step and
chunked through an image; the pixel shuffle and the tile prompt equal the reference's;
loading is strict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

from models import ModelLoadError, load_model
from models.processors import image_features, image_tokens_for_size
from models.smolvlm import pixel_shuffle
from tests.engine.qwen_vl_reference import picture
from tests.models.paged import PagedSession, relative_error
from tests.smolvlm_checkpoints import TOKENS_PER_TILE, Family, make_tiny_smolvlm

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    family: Family = request.param
    return make_tiny_smolvlm(tmp_path_factory.mktemp(family), family=family)


def two_image_prompt(folder: Path) -> tuple[list[int], torch.Tensor, list[np.ndarray]]:
    """Token ids with a wide (3x2 tiles) and a tall (1x3) image, and each image's tiles."""
    loaded = load_model(folder)
    tokenizer = loaded.tokenizer
    features = [
        image_features(picture(h, w, i), loaded.image_processor)
        for i, (h, w) in enumerate([(30, 50), (60, 20)])
    ]
    text = f"hi{features[0].prompt_text}and{features[1].prompt_text}there"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return (
        ids,
        torch.from_numpy(np.concatenate([f.pixel_values for f in features])),
        [f.pixel_values for f in features],
    )


@pytest.mark.parametrize("chunks", [[1.0], [0.3, 0.7]])
def test_logits_equal_transformers(folder: Path, chunks: list[float]) -> None:
    loaded = load_model(folder)
    model, image_token = loaded.model, loaded.info.image_token_id
    ids, all_tiles, tiles = two_image_prompt(folder)
    reference = AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids]), pixel_values=all_tiles[None]).logits[0]
    embeds = torch.cat(
        model.encode_image_batch([{"pixel_values": torch.from_numpy(t)} for t in tiles])
    )
    session, done, used = PagedSession(model), 0, 0
    for share in chunks:
        end = len(ids) if share == chunks[-1] else int(len(ids) * share)
        chunk = ids[done:end]
        attn_inputs, _ = session.attention_inputs([(0, chunk)])
        rows = chunk.count(image_token)
        hidden = model.forward(
            torch.tensor(chunk),
            torch.arange(done, end),
            attn_inputs,
            session.cache,
            embeds[used : used + rows] if rows else None,
        )
        session.lengths[0] = end
        assert relative_error(model.compute_logits(hidden), expected[done:end]) < TOLERANCE
        done, used = end, used + rows
    assert used == ids.count(image_token) == (7 + 4) * TOKENS_PER_TILE


def test_an_images_tokens_follow_its_tiles(folder: Path) -> None:
    loaded = load_model(folder)
    for detail, tiles in (("auto", 7), ("low", 1)):
        features = image_features(picture(30, 50, 0), loaded.image_processor, detail)
        assert features.pixel_values.shape == (tiles, 3, 32, 32)
        count = loaded.model.image_tokens({"pixel_values": features.pixel_values})
        assert count == features.num_tokens == tiles * TOKENS_PER_TILE


@pytest.mark.parametrize("detail", ["auto", "low", "high"])
def test_the_count_from_the_size_alone_equals_the_tiled_images(folder: Path, detail: str) -> None:
    """What the image-token cap reads from a header equals what the processed image becomes,
    over sizes that fit one tile, wide, tall, square and odd aspect ratios."""
    processor = load_model(folder).image_processor
    for height, width in [(20, 20), (30, 50), (50, 30), (64, 64), (33, 97), (97, 33), (7, 200)]:
        expected = image_features(picture(height, width, seed=2), processor, detail)
        assert image_tokens_for_size(processor, width, height, detail) == expected.num_tokens


@pytest.mark.parametrize("side, scale", [(4, 2), (32, 4), (6, 3)])  # SmolVLM-256M: 32, 4
def test_pixel_shuffle_equals_the_reference_connector(side: int, scale: int) -> None:
    features = torch.randn(3, side * side, 5)  # 3 tiles of side x side patches
    connector = SmolVLMConnector.pixel_shuffle
    reference = connector(None, features, scale_factor=scale)  # type: ignore[arg-type]
    torch.testing.assert_close(pixel_shuffle(features, scale), reference, rtol=0, atol=0)


@pytest.mark.parametrize("rows, cols", [(0, 0), (1, 3), (3, 2)])
def test_prompt_text_equals_the_reference(folder: Path, rows: int, cols: int) -> None:
    processor = load_model(folder).image_processor
    expected = get_image_prompt_string(
        rows, cols, TOKENS_PER_TILE, "<fake_token_around_image>", "<image>", "<global-img>"
    )
    assert processor.prompt_text(rows, cols) == expected


def copied(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in folder.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    return copy


def test_a_processor_of_another_tile_size_is_refused(folder: Path, tmp_path: Path) -> None:
    copy = copied(folder, tmp_path)
    settings = json.loads((copy / "processor_config.json").read_text())
    settings["image_seq_len"] = TOKENS_PER_TILE + 1
    (copy / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ModelLoadError, match=f"image_seq_len is {TOKENS_PER_TILE + 1}"):
        load_model(copy)


def test_a_connector_tensor_too_many_is_refused(folder: Path, tmp_path: Path) -> None:
    copy = copied(folder, tmp_path)
    weights = load_file(copy / "model.safetensors")
    weights["model.connector.modality_projection.proj.bias"] = torch.zeros(2)
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="modality_projection"):
        load_model(copy)


def test_a_chat_template_only_the_processor_saved_is_read(folder: Path, tmp_path: Path) -> None:
    """Folders saved by older transformers keep it in chat_template.json, which the
    tokenizer does not read (SmolVLM's and Qwen2-VL's published ones)."""
    copy = copied(folder, tmp_path)
    template = (copy / "chat_template.jinja").read_text()
    (copy / "chat_template.jinja").unlink()
    (copy / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert load_model(copy).chat_template == template
