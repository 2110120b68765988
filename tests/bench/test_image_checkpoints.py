"""The image-chat checkpoints: what each side of a comparison loads from them.

mmgpt loads the Qwen2.5-VL one through its own loader; `transformers serve`'s
processor comes from AutoProcessor with bench.peers.transformers_images' image-only
classes registered (no torchvision here), and must expand each image into as many
placeholders as the image processor's grid says, with the same pixels.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
    SmolVLMForConditionalGeneration,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from bench.images import MIXED_SIZES, SyntheticImages
from bench.peers.transformers_images import register_image_only_processors
from bench.qwen_vl_checkpoint import SHAPES as QWEN_SHAPES
from bench.qwen_vl_checkpoint import SPECIAL_TOKENS, QwenVLShape, build_qwen_tokenizer
from bench.smolvlm_checkpoint import IMAGE_TOKENS, SCALE_FACTOR, SmolVLMShape
from bench.smolvlm_checkpoint import SHAPES as SMOLVLM_SHAPES
from models import load_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def image_only_processors() -> Iterator[None]:
    """Registered as the launcher registers them, for this test only."""
    registered = dict(PROCESSOR_MAPPING._extra_content)
    register_image_only_processors()
    yield
    PROCESSOR_MAPPING._extra_content.clear()
    PROCESSOR_MAPPING._extra_content.update(registered)


def _chat(images: list[Image.Image], text: str = "Describe the image.") -> list[dict]:
    content: list[dict] = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def _mixed(count: int) -> list[Image.Image]:
    source = SyntheticImages(seed=0, sizes=MIXED_SIZES)
    return [Image.open(io.BytesIO(source.image_png(index))) for index in range(count)]


def test_qwen_special_tokens_follow_the_regular_vocabulary() -> None:
    """With Qwen's 151,643 regular tokens, <|endoftext|> .. <|video_pad|> get Qwen's ids."""
    regular = QWEN_SHAPES["tiny"].regular_tokens
    tokenizer = build_qwen_tokenizer(regular)
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    assert ids == list(range(regular, regular + len(SPECIAL_TOKENS)))
    assert QWEN_SHAPES["scaled"].regular_tokens == 151_643


def test_mmgpt_loads_the_qwen_vl_checkpoint(bench_qwen_vl: Path) -> None:
    loaded = load_model(bench_qwen_vl, device="cpu", dtype="float32")
    assert loaded.info.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert loaded.info.image_token_id == loaded.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert loaded.info.position_sections == 3


def test_the_peer_processor_expands_each_qwen_image_by_its_grid(bench_qwen_vl: Path) -> None:
    processor = AutoProcessor.from_pretrained(bench_qwen_vl)
    images = _mixed(3)
    inputs = processor.apply_chat_template(
        _chat(images[:2]), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    reference = AutoImageProcessor.from_pretrained(bench_qwen_vl)(images[:2])
    grids = np.asarray(inputs["image_grid_thw"])
    assert np.array_equal(grids, reference["image_grid_thw"])
    assert np.array_equal(inputs["pixel_values"], reference["pixel_values"])
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert inputs["input_ids"][0].count(image_pad) == grids.prod(axis=1).sum() // 4
    assert len({tuple(grid) for grid in grids}) == 2  # two sizes, two token counts


def test_the_peer_processor_runs_qwen_generate(bench_qwen_vl: Path) -> None:
    processor = AutoProcessor.from_pretrained(bench_qwen_vl)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(bench_qwen_vl).eval()
    inputs = processor.apply_chat_template(
        _chat(_mixed(1)),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 4


def test_the_peer_processor_tiles_smolvlm_images(bench_smolvlm: Path) -> None:
    processor = AutoProcessor.from_pretrained(bench_smolvlm)
    image = Image.new("RGB", (200, 120), (128, 64, 32))  # 4 x 2 tiles of 64 after resizing
    inputs = processor.apply_chat_template(
        _chat([image]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    tiles = inputs["pixel_values"].shape[1]
    assert tiles > 2  # several tiles and the global image
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_token).sum()) == tiles * processor.image_seq_len
    model = SmolVLMForConditionalGeneration.from_pretrained(bench_smolvlm).eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("shape", QWEN_SHAPES.values(), ids=QWEN_SHAPES.keys())
def test_qwen_shapes_are_consistent(shape: QwenVLShape) -> None:
    """M-RoPE sections cover half of each head; full-attention blocks exist."""
    assert 2 * sum(shape.mrope_section) == shape.text_width // shape.text_heads
    assert shape.text_width % shape.text_heads == 0 and shape.vision_width % shape.vision_heads == 0
    assert all(block < shape.vision_depth for block in shape.full_attention_blocks)
    assert shape.embedding_rows >= shape.regular_tokens + len(SPECIAL_TOKENS)


@pytest.mark.parametrize("shape", SMOLVLM_SHAPES.values(), ids=SMOLVLM_SHAPES.keys())
def test_smolvlm_tiles_shuffle_into_whole_tokens(shape: SmolVLMShape) -> None:
    assert shape.tile % (shape.patch * SCALE_FACTOR) == 0
    assert shape.embedding_rows >= shape.regular_tokens + 1 + len(IMAGE_TOKENS)
