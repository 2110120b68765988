"""The engine on tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints: greedy outputs equal
transformers' generate() for images of several sizes, two images in one message, text,
a mixed batch, prefill chunks that cut through an image, preemption, a prefix-cache hit
and forked samples; the step's new images go through the tower in one packed call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine.engine_core import EngineCore
from app.engine.sequence import SamplingParams
from tests.engine.drive import Job, load, make_core, run_jobs
from tests.engine.qwen_vl_reference import QwenVLReference, Request, picture
from tests.qwen_vl_checkpoints import FAMILIES, make_tiny_qwen_vl

MAX_NEW = 10
# (height, width): wide, tall, square, one past the processor's max pixels, one at its min
SIZES = [(30, 50), (40, 24), (32, 32), (90, 70), (9, 12)]


@pytest.fixture(scope="module", params=FAMILIES)
def reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> QwenVLReference:
    folder = make_tiny_qwen_vl(tmp_path_factory.mktemp(request.param), family=request.param)
    return QwenVLReference(load(Path(folder)))


def greedy(n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, max_tokens=MAX_NEW, temperature=0.0)


def requests(reference: QwenVLReference) -> list[Request]:
    pictures = [picture(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    return [
        *[reference.request("the red circle", [p]) for p in pictures],
        reference.request("two of them", [pictures[0], pictures[1]]),
        reference.request("describe what is in the picture", []),
    ]


def run(
    core: EngineCore, reference: QwenVLReference, batch: list[Request], n: int = 1
) -> list[list[int]]:
    jobs: list[Job] = [reference.job(r, greedy(n)) for r in batch]
    return [sample.token_ids for samples in run_jobs(core, jobs) for sample in samples]


def expected(reference: QwenVLReference, batch: list[Request], n: int = 1) -> list[list[int]]:
    return [reference.generate(r, MAX_NEW) for r in batch for _ in range(n)]


def test_processor_and_prompt_equal_transformers(reference: QwenVLReference) -> None:
    for request in requests(reference):
        inputs = request.reference_inputs
        assert request.prompt == inputs["input_ids"][0].tolist()
        if not request.images:
            continue
        ours = np.concatenate([image.pixel_values for image in request.images])
        np.testing.assert_array_equal(ours, inputs["pixel_values"].numpy())
        grids = np.stack([image.extra["image_grid_thw"] for image in request.images])
        np.testing.assert_array_equal(grids, inputs["image_grid_thw"].numpy())
    counts = {image.num_tokens for r in requests(reference) for image in r.images}
    assert len(counts) >= 4  # the sizes really give different token counts


def test_mixed_batch_equals_generate(reference: QwenVLReference) -> None:
    batch = requests(reference)
    assert run(make_core(reference.loaded), reference, batch) == expected(reference, batch)


def test_prefill_chunks_cut_through_images(
    reference: QwenVLReference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk may end inside an image: the embedding is computed once, cached, and the
    next chunk takes its remaining rows."""
    batch = requests(reference)[:2] + requests(reference)[5:6]
    core = make_core(reference.loaded, max_num_batched_tokens=8, max_num_seqs=4)
    encoded = _count_encoded(core, monkeypatch)
    assert run(core, reference, batch) == expected(reference, batch)
    assert all(span.length > 8 for r in batch for span in reference.job(r, greedy()).spans)
    assert sum(encoded) == 2  # each distinct image once, though its tokens span several steps


def test_preemption_and_forks_equal_generate(reference: QwenVLReference) -> None:
    batch = requests(reference)[:4]
    per_token = reference.loaded.info.kv_bytes_per_token()
    core = make_core(reference.loaded, kv_cache_bytes=96 * per_token, block_size=8)
    assert run(core, reference, batch, n=2) == expected(reference, batch, n=2)
    assert core.scheduler.num_preemptions > 0


def test_second_question_about_an_image_hits_the_prefix_cache(reference: QwenVLReference) -> None:
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


def test_new_images_of_a_step_are_encoded_in_one_packed_call(
    reference: QwenVLReference, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = requests(reference)[:3]
    core = make_core(reference.loaded)
    encoded = _count_encoded(core, monkeypatch)
    run(core, reference, batch)
    assert encoded == [3]


def _count_encoded(core: EngineCore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Images per call of the model's tower, recorded as the runner makes the calls."""
    calls: list[int] = []
    model = core.runner.model
    real = model.encode_image_batch

    def counting(images: Sequence[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
        calls.append(len(images))
        return real(images)

    monkeypatch.setattr(model, "encode_image_batch", counting)
    return calls
