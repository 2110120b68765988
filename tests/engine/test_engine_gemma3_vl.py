"""The engine on a tiny Gemma 3 with images (16 tokens each, local layers of an 8-token
window): the prompt is the one transformers' processor writes, and greedy outputs equal
transformers' generate() for one and two images, text, a mixed batch, prefill chunks
smaller than an image (which is kept whole), preemption and a prefix-cache hit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.engine.engine_core import EngineCore
from app.engine.sequence import SamplingParams
from tests.engine.drive import Job, load, make_core, run_jobs
from tests.engine.gemma3_reference import Gemma3Reference
from tests.engine.qwen_vl_reference import Request, picture
from tests.gemma3_checkpoints import make_tiny_gemma3_vl

MAX_NEW = 10
pytestmark = pytest.mark.parametrize("decode_path", ["gather", "mirror"], indirect=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Gemma3Reference:
    folder = make_tiny_gemma3_vl(tmp_path_factory.mktemp("gemma3-vl"))
    return Gemma3Reference(load(Path(folder)))


@pytest.fixture(scope="module")
def requests(reference: Gemma3Reference) -> list[Request]:
    pictures = [picture(h, w, seed) for seed, (h, w) in enumerate([(30, 50), (32, 32), (64, 40)])]
    return [
        reference.request("the red circle", [pictures[0]]),
        reference.request("what colour is the large square on the left", [pictures[1]]),
        reference.request("two of them", [pictures[1], pictures[2]]),
        reference.request("describe what is in the picture and the shapes near it", []),
    ]


@pytest.fixture(scope="module")
def expected(reference: Gemma3Reference, requests: list[Request]) -> list[list[int]]:
    return [reference.generate(r, MAX_NEW) for r in requests]


def run(core: EngineCore, reference: Gemma3Reference, batch: list[Request]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    jobs: list[Job] = [reference.job(r, params) for r in batch]
    return [samples[0].token_ids for samples in run_jobs(core, jobs)]


def test_prompt_and_pixels_equal_the_processor(requests: list[Request], decode_path: str) -> None:
    for request in requests:
        inputs = request.reference_inputs
        assert request.prompt == inputs["input_ids"][0].tolist()
        if request.images:
            ours = np.stack([image.pixel_values for image in request.images])
            np.testing.assert_array_equal(ours, inputs["pixel_values"].numpy())


def test_mixed_batch_matches_generate(
    reference: Gemma3Reference, requests: list[Request], expected: list[list[int]], decode_path: str
) -> None:
    assert run(make_core(reference.loaded, block_size=4), reference, requests) == expected


@pytest.mark.parametrize("budget", [7, 20])  # below an image's 16 tokens, and above
def test_chunked_prefill_keeps_images_whole_and_matches_generate(
    reference: Gemma3Reference,
    requests: list[Request],
    expected: list[list[int]],
    decode_path: str,
    budget: int,
) -> None:
    core = make_core(reference.loaded, block_size=4, max_num_batched_tokens=budget)
    assert run(core, reference, requests) == expected


def test_preemption_recomputes_the_same_outputs(
    reference: Gemma3Reference, requests: list[Request], expected: list[list[int]], decode_path: str
) -> None:
    per_token = reference.loaded.info.kv_bytes_per_token()
    core = make_core(reference.loaded, block_size=4, kv_cache_bytes=96 * per_token)
    assert run(core, reference, requests) == expected
    assert core.scheduler.num_preemptions > 0


def test_prefix_cache_hit_on_an_image_matches_generate(
    reference: Gemma3Reference, decode_path: str
) -> None:
    image = picture(40, 40, seed=7)
    first = reference.request("the red circle on the left", [image])
    second = reference.request("the blue square on the right", [image])
    core = make_core(reference.loaded, block_size=4)
    run(core, reference, [first])
    hits_before = core.block_manager.prefix_cache_hits
    assert run(core, reference, [second]) == [reference.generate(second, MAX_NEW)]
    assert core.block_manager.prefix_cache_hits - hits_before >= 16  # past the image
