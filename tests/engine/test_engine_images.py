"""End-to-end engine runs on a tiny random LLaVA: images batched, chunked, cached and shared."""

from __future__ import annotations

import hashlib
import random

import numpy as np

from app.engine.engine_core import EngineCore
from app.engine.sequence import ImageInput, SamplingParams
from app.engine.stats import StatsUpdate
from app.engine.validation import image_spans
from models.base import LoadedModel
from tests.engine.drive import Job, Sample, make_core, run_alone, run_jobs

FIRST_TEXT_TOKEN = 4  # ids below are <pad>, <s>, </s>, <image>


def make_images(loaded: LoadedModel, count: int, seed: int) -> list[ImageInput]:
    rng = np.random.default_rng(seed)
    size = loaded.info.image_size
    images = []
    for _ in range(count):
        pixels = rng.standard_normal((3, size, size)).astype(np.float32)
        images.append(ImageInput(pixels, hashlib.sha256(pixels.tobytes()).hexdigest()))
    return images


def image_job(
    loaded: LoadedModel, parts: list[list[int] | ImageInput], params: SamplingParams
) -> Job:
    """A prompt from text pieces and images (each image becomes its run of image tokens)."""
    info = loaded.info
    assert info.image_token_id is not None
    prompt: list[int] = []
    images = []
    for part in parts:
        if isinstance(part, ImageInput):
            prompt += [info.image_token_id] * info.image_seq_length
            images.append(part)
        else:
            prompt += part
    return Job(prompt, params, image_spans(prompt, images, info))


def random_image_jobs(loaded: LoadedModel, count: int, seed: int) -> list[Job]:
    rng = random.Random(seed)
    pool = make_images(loaded, 6, seed)

    def text() -> list[int]:
        return [rng.randrange(FIRST_TEXT_TOKEN, 384) for _ in range(rng.randint(0, 30))]

    jobs = []
    for _ in range(count):
        parts: list[list[int] | ImageInput] = [
            [1],
            *[p for _ in range(rng.randint(0, 2)) for p in (text(), rng.choice(pool))],
            text(),
        ]
        params = SamplingParams(max_tokens=rng.randint(1, 30), temperature=0.0)
        jobs.append(image_job(loaded, parts, params))
    return jobs


def tokens(results: list[list[Sample]]) -> list[list[int]]:
    return [samples[0].token_ids for samples in results]


def test_64_concurrent_greedy_image_requests_match_each_alone(llava: LoadedModel) -> None:
    jobs = random_image_jobs(llava, 64, seed=1)
    assert sum(bool(job.spans) for job in jobs) > 32
    batched_core = make_core(llava, max_num_batched_tokens=64, max_num_seqs=64)
    together = run_jobs(batched_core, jobs)
    alone = run_alone(make_core(llava, enable_prefix_caching=False, image_cache_size=0), jobs)
    differences = sum(a != b for a, b in zip(tokens(together), tokens(alone), strict=True))
    assert differences <= 1
    assert batched_core.runner.image_cache.hits > 0  # the pool's images were reused


def test_forced_preemption_with_images_gives_the_unconstrained_outputs(llava: LoadedModel) -> None:
    jobs = random_image_jobs(llava, 16, seed=2)
    for job in jobs:
        job.params.ignore_eos = True
    unconstrained = run_jobs(make_core(llava), jobs)
    tight = make_core(
        llava, kv_cache_bytes=160 * llava.info.kv_bytes_per_token(), max_num_batched_tokens=48
    )
    constrained = run_jobs(tight, jobs)
    assert tight.scheduler.num_preemptions > 0
    differences = sum(
        a != b for a, b in zip(tokens(constrained), tokens(unconstrained), strict=True)
    )
    assert differences <= 1


def batch_tokens_total(updates: list[StatsUpdate]) -> int:
    return sum(update.step.num_batched_tokens for update in updates if update.step is not None)


def test_a_second_question_about_the_same_image_reuses_its_blocks(llava: LoadedModel) -> None:
    block = 16
    assert llava.info.image_seq_length == block  # the image fills exactly the second block
    image = make_images(llava, 1, seed=3)[0]
    system = [1, *range(100, 115)]  # 16 tokens: the first block
    params = SamplingParams(max_tokens=4, temperature=0.0)
    first = image_job(llava, [system, image, [40, 41, 42, 43]], params)
    second = image_job(llava, [system, image, [50, 51, 52]], params)
    other_system = image_job(llava, [[1, *range(200, 215)], image, [50, 51, 52]], params)
    updates: list[StatsUpdate] = []
    core = make_core(llava, updates.append)
    run_jobs(core, [first])
    cache = core.runner.image_cache
    hits, image_queries = core.block_manager.prefix_cache_hits, cache.queries
    computed_before = batch_tokens_total(updates)
    result = run_jobs(core, [second])[0][0]
    assert result.outputs[-1].num_cached_tokens == 2 * block
    assert core.block_manager.prefix_cache_hits - hits == 2 * block
    assert batch_tokens_total(updates) - computed_before == len(second.prompt) - 2 * block + 3
    assert cache.queries == image_queries  # the image's tokens were all cached: no encoding
    run_jobs(core, [other_system])
    assert (cache.queries, cache.hits) == (image_queries + 1, 1)  # its embedding was
    fresh = run_jobs(make_core(llava, enable_prefix_caching=False), [second])[0][0]
    assert result.token_ids == fresh.token_ids


def test_an_image_split_across_prefill_chunks(llava: LoadedModel) -> None:
    image = make_images(llava, 1, seed=4)[0]
    job = image_job(
        llava, [[1, 5, 6, 7, 8, 9], image, [10, 11]], SamplingParams(max_tokens=6, temperature=0.0)
    )
    whole = run_jobs(make_core(llava), [job])[0][0]
    chunked_core: EngineCore = make_core(llava, max_num_batched_tokens=5)
    chunked = run_jobs(chunked_core, [job])[0][0]
    assert chunked.token_ids == whole.token_ids
    assert chunked_core.runner.image_cache.queries == 1


def test_greedy_image_requests_match_transformers_generate(llava: LoadedModel) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(llava.path, dtype=torch.float32)
    images = make_images(llava, 2, seed=5)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    jobs = [image_job(llava, [[1, 20, 21], image, [30, 31, 32]], params) for image in images]
    results = run_jobs(make_core(llava), jobs)
    for job, image, samples in zip(jobs, images, results, strict=True):
        generated = hf.generate(
            input_ids=torch.tensor([job.prompt]),
            attention_mask=torch.ones(1, len(job.prompt), dtype=torch.long),
            pixel_values=torch.from_numpy(image.pixel_values)[None],
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
        )
        assert samples[0].token_ids == generated[0, len(job.prompt) :].tolist()
    assert results[0][0].token_ids != results[1][0].token_ids  # the image matters


def test_the_image_placeholder_is_never_generated(llava: LoadedModel) -> None:
    image_token = llava.info.image_token_id
    jobs = random_image_jobs(llava, 32, seed=6)
    for i, job in enumerate(jobs):
        job.params.temperature, job.params.seed, job.params.max_tokens = 3.0, i, 30
        job.params.ignore_eos = True
    results = run_jobs(make_core(llava), jobs)
    assert all(samples[0].finish_reason == "length" for samples in results)
    assert all(image_token not in samples[0].token_ids for samples in results)
