"""The engine on tiny random SmolVLM / Idefics3 checkpoints: our tiles, pixels and prompt
ids equal transformers' processor's, and greedy outputs equal transformers' generate() for
images of several tile grids, two images in one message, text, a mixed batch, prefill
chunks that end inside an image or between its tiles, preemption, a prefix-cache hit and
detail "low" (one tile); the step's new images go through the tower in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.engine.engine_core import EngineCore
from app.engine.sequence import SamplingParams
from tests.engine.drive import Job, load, make_core, run_jobs
from tests.engine.qwen_vl_reference import QwenVLReference, Request, picture
from tests.engine.test_engine_qwen_vl import _count_encoded
from tests.smolvlm_checkpoints import TOKENS_PER_TILE, Family, make_tiny_smolvlm
from tests.smolvlm_checkpoints import reference_processor as family_processor

MAX_NEW = 10
# (height, width) -> tiles (rows x cols, plus the global image): 2x3, 3x1, 3x3, 1x3, 3x3
SIZES = [(30, 50), (60, 20), (32, 32), (10, 40), (90, 70)]


class SmolVLMReference(QwenVLReference):
    """Requests built by mmgpt's path and by transformers' SmolVLM / Idefics3 processor."""

    def __init__(self, folder: Path, family: Family) -> None:
        super().__init__(load(folder), family_processor(folder, family))

    def request(self, text: str, pictures: list[Image.Image], detail: str = "auto") -> Request:
        request = super().request(text, pictures, detail)
        if detail == "low":  # the reference's processor reads the image as one tile
            rendered = self.prompts._render(_message(text, len(pictures)), "messages")
            inputs: dict[str, Any] = {"text": [rendered], "images": pictures}
            request.reference_inputs = dict(
                self.processor(**inputs, return_tensors="pt", do_image_splitting=False)
            )
        return request


def _message(text: str, num_images: int) -> list[dict[str, Any]]:
    parts: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> SmolVLMReference:
    family: Family = request.param
    folder = make_tiny_smolvlm(tmp_path_factory.mktemp(family), family=family)
    return SmolVLMReference(folder, family)


def greedy(n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, max_tokens=MAX_NEW, temperature=0.0)


def requests(reference: SmolVLMReference) -> list[Request]:
    pictures = [picture(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    return [
        *[reference.request("the red circle", [p]) for p in pictures],
        reference.request("two of them", [pictures[0], pictures[1]]),
        reference.request("describe what is in the picture", []),
        reference.request("small", [pictures[2]], detail="low"),
    ]


def run(
    core: EngineCore, reference: SmolVLMReference, batch: list[Request], n: int = 1
) -> list[list[int]]:
    jobs: list[Job] = [reference.job(r, greedy(n)) for r in batch]
    return [sample.token_ids for samples in run_jobs(core, jobs) for sample in samples]


def expected(reference: SmolVLMReference, batch: list[Request], n: int = 1) -> list[list[int]]:
    return [reference.generate(r, MAX_NEW) for r in batch for _ in range(n)]


def test_tiles_and_prompt_equal_transformers(reference: SmolVLMReference) -> None:
    for request in requests(reference):
        inputs = request.reference_inputs
        assert request.prompt == inputs["input_ids"][0].tolist()
        if not request.images:
            continue
        ours = np.concatenate([image.pixel_values for image in request.images])
        np.testing.assert_array_equal(ours, inputs["pixel_values"][0].numpy())
        assert inputs["pixel_attention_mask"].all()  # one image's tiles are never padded
    counts = [image.num_tokens for r in requests(reference) for image in r.images]
    assert counts[:5] == [t * TOKENS_PER_TILE for t in (7, 4, 10, 4, 10)]
    assert counts[-1] == TOKENS_PER_TILE  # detail "low": the global image alone


def test_mixed_batch_equals_generate(reference: SmolVLMReference) -> None:
    batch = requests(reference)
    assert run(make_core(reference.loaded), reference, batch) == expected(reference, batch)


def test_prefill_chunks_cut_through_images(
    reference: SmolVLMReference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 5 tokens end inside tiles and between them (on the row/column tags): the
    embedding is computed once, cached, and each chunk takes the rows of its image tokens."""
    batch = [requests(reference)[i] for i in (0, 5, 6)]
    core = make_core(reference.loaded, max_num_batched_tokens=5, max_num_seqs=4)
    encoded = _count_encoded(core, monkeypatch)
    assert run(core, reference, batch) == expected(reference, batch)
    assert sum(encoded) == 2  # each distinct image once, though its tokens span many steps


def test_preemption_and_forks_equal_generate(reference: SmolVLMReference) -> None:
    batch = requests(reference)[:4]
    per_token = reference.loaded.info.kv_bytes_per_token()
    core = make_core(reference.loaded, kv_cache_bytes=96 * per_token, block_size=8)
    assert run(core, reference, batch, n=2) == expected(reference, batch, n=2)
    assert core.scheduler.num_preemptions > 0


def test_second_question_about_an_image_hits_the_prefix_cache(
    reference: SmolVLMReference,
) -> None:
    image = picture(40, 56, seed=7)
    first = reference.request("the red circle", [image])
    second = reference.request("what colour is the square", [image])
    core = make_core(reference.loaded, block_size=4)
    run(core, reference, [first])
    job = reference.job(second, greedy())
    core.add_request("again", job.prompt, job.params, job.spans, sink=0)
    outputs = [output for _ in range(100) if core.has_unfinished for _, output in core.step()]
    assert outputs[-1].num_cached_tokens >= job.spans[0].end - 4
    assert [t for o in outputs for t in o.token_ids] == reference.generate(second, MAX_NEW)


def test_new_images_of_a_step_are_encoded_in_one_call(
    reference: SmolVLMReference, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = requests(reference)[:3]
    core = make_core(reference.loaded)
    encoded = _count_encoded(core, monkeypatch)
    run(core, reference, batch)
    assert encoded == [3]
