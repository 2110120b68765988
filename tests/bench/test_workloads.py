"""Workloads are deterministic, hit their prompt lengths and carry real images."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image
from tokenizers import Tokenizer

from bench.images import MIXED_SIZES, SceneImages, SyntheticImages
from bench.workloads import BenchRequest, WorkloadSpec, build_requests


def test_the_same_seed_gives_the_same_requests() -> None:
    spec = WorkloadSpec("chat-image", num_prompts=4, image_source="synthetic", seed=3)
    assert build_requests(spec) == build_requests(spec)
    assert build_requests(spec) != build_requests(
        WorkloadSpec("chat-image", 4, seed=4, image_source="synthetic")
    )


@pytest.mark.parametrize("input_len", [1, 17, 64])
def test_text_prompts_have_the_exact_token_count(tiny_gpt2: Path, input_len: int) -> None:
    spec = WorkloadSpec("text", num_prompts=5, input_len=input_len, tokenizer=str(tiny_gpt2))
    tokenizer = Tokenizer.from_file(str(tiny_gpt2 / "tokenizer.json"))
    for request in build_requests(spec):
        ids = tokenizer.encode(request.fields["prompt"], add_special_tokens=False).ids
        assert len(ids) == input_len


def test_sampling_fields_reach_every_request() -> None:
    spec = WorkloadSpec(
        "qa",
        num_prompts=2,
        output_len=7,
        temperature=0.5,
        top_p=0.9,
        ignore_eos=True,
        image_source="synthetic",
    )
    for request in build_requests(spec):
        assert request.api == "qa"
        assert request.fields["max_tokens"] == 7 and request.fields["temperature"] == 0.5
        assert request.fields["top_p"] == 0.9
        assert request.fields["ignore_eos"] is True and request.fields["question"].endswith("?")


def test_synthetic_images_are_64_pixel_pngs() -> None:
    images = SyntheticImages(seed=1)
    first = Image.open(io.BytesIO(images.image_png(0)))
    assert first.size == (64, 64) and first.format == "PNG"
    assert images.image_png(0) != images.image_png(1)


def test_scene_images_come_from_the_held_out_scenes() -> None:
    scenes = pytest.importorskip("models.scenes")
    source = SceneImages(seed=0)
    expected = scenes.sample(scenes.EVAL_SEED_START + 2)
    assert Image.open(io.BytesIO(source.image_png(2))).size == expected.image.size
    assert source.question(2) in [question for question, _ in expected.qa]


@pytest.mark.parametrize("source", [SceneImages, SyntheticImages])
def test_workload_seeds_draw_disjoint_images(source: type[SceneImages | SyntheticImages]) -> None:
    """Rounds with seeds 1, 2, 3 must not meet an image an earlier one left in a cache."""
    if source is SceneImages:
        pytest.importorskip("models.scenes")
    drawn = [{source(seed=seed).image_png(i) for i in range(48)} for seed in (1, 2, 3)]
    assert all(len(images) > 40 for images in drawn)  # scenes may repeat a picture by chance
    assert not (drawn[0] & drawn[1]) and not (drawn[1] & drawn[2]) and not (drawn[0] & drawn[2])


def test_repeat_image_asks_different_questions_about_one_image() -> None:
    spec = WorkloadSpec("qa", num_prompts=4, repeat_image=2, image_source="synthetic")
    first, second, third, _ = build_requests(spec)
    assert first.image_png == second.image_png != third.image_png
    assert first.fields["question"] != second.fields["question"]


def _image_sizes(request: BenchRequest) -> list[tuple[int, int]]:
    parts = request.fields["messages"][0]["content"]
    urls = [part["image_url"]["url"] for part in parts if part["type"] == "image_url"]
    return [Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size for url in urls]


def test_mixed_image_chat_varies_sizes_and_sends_two_images_in_every_fourth() -> None:
    spec = WorkloadSpec("chat-image-mixed", num_prompts=8, output_len=5, ignore_eos=True)
    requests = build_requests(spec)
    assert requests == build_requests(spec)
    sizes = [_image_sizes(request) for request in requests]
    assert [len(each) for each in sizes] == [1, 1, 1, 2, 1, 1, 1, 2]
    firsts = [each[0] for each in sizes]
    assert firsts == list(MIXED_SIZES)  # the first images run through the sizes in order
    assert any(w > h for w, h in firsts) and any(w < h for w, h in firsts)
    for request in requests:
        assert request.api == "chat" and request.fields["max_tokens"] == 5
        assert request.fields["ignore_eos"] is True
        assert request.fields["messages"][0]["content"][-1]["type"] == "text"
