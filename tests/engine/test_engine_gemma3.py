"""The engine on a tiny Gemma 3 whose local layers see 8 tokens: greedy outputs equal
transformers' generate() with prompts longer than the window, whole or chunked below and
across it, under preemption and after a prefix-cache hit, in both decode paths."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.engine.sequence import SamplingParams
from models.base import LoadedModel
from tests.engine.drive import Job, load, make_core, run_jobs
from tests.gemma3_checkpoints import SLIDING_WINDOW, make_tiny_gemma3_text

FIRST_TEXT_TOKEN = 3  # ids below are <pad>, <s>, </s>
pytestmark = pytest.mark.parametrize("decode_path", ["gather", "mirror"], indirect=True)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load(make_tiny_gemma3_text(tmp_path_factory.mktemp("tiny-gemma3")))


@pytest.fixture(scope="module")
def reference(gemma3: LoadedModel) -> Callable[[Job], list[int]]:
    """transformers' greedy continuation of a job, computed once per prompt."""
    model = AutoModelForCausalLM.from_pretrained(gemma3.path, dtype=torch.float32).eval()
    memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def greedy(job: Job) -> list[int]:
        key = (tuple(job.prompt), job.params.max_tokens)
        if key not in memo:
            prompt = torch.tensor([job.prompt])
            with torch.no_grad():
                out = model.generate(
                    prompt, max_new_tokens=job.params.max_tokens, do_sample=False, eos_token_id=None
                )
            memo[key] = out[0, prompt.shape[1] :].tolist()
        return memo[key]

    return greedy


def greedy_jobs(count: int, seed: int, *, prefix: list[int] | None = None) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(count):
        length = rng.randint(SLIDING_WINDOW // 2, 6 * SLIDING_WINDOW)
        prompt = [*(prefix or []), *(rng.randrange(FIRST_TEXT_TOKEN, 384) for _ in range(length))]
        params = SamplingParams(max_tokens=rng.randint(8, 24), temperature=0.0, ignore_eos=True)
        jobs.append(Job(prompt, params))
    return jobs


def assert_as_reference(
    jobs: list[Job], results: list, reference: Callable[[Job], list[int]]
) -> None:
    for job, samples in zip(jobs, results, strict=True):
        assert samples[0].token_ids == reference(job), len(job.prompt)


@pytest.mark.parametrize("block_size", [4, 16])  # blocks smaller than the window, and larger
def test_batched_greedy_matches_generate(
    gemma3: LoadedModel,
    reference: Callable[[Job], list[int]],
    decode_path: str,
    block_size: int,
) -> None:
    jobs = greedy_jobs(6, seed=1)
    core = make_core(gemma3, block_size=block_size)
    assert_as_reference(jobs, run_jobs(core, jobs), reference)


@pytest.mark.parametrize("budget", [5, 11])  # chunks inside the window, and across it
def test_chunked_prefill_matches_generate(
    gemma3: LoadedModel, reference: Callable[[Job], list[int]], decode_path: str, budget: int
) -> None:
    jobs = greedy_jobs(4, seed=2)
    core = make_core(gemma3, block_size=4, max_num_batched_tokens=budget)
    assert_as_reference(jobs, run_jobs(core, jobs), reference)


def test_preemption_recomputes_the_same_outputs(
    gemma3: LoadedModel, reference: Callable[[Job], list[int]], decode_path: str
) -> None:
    jobs = greedy_jobs(8, seed=3)
    tokens = 80  # every job fits alone, not all together
    core = make_core(gemma3, block_size=4, kv_cache_bytes=tokens * gemma3.info.kv_bytes_per_token())
    assert_as_reference(jobs, run_jobs(core, jobs), reference)
    assert core.scheduler.num_preemptions > 0


def test_prefix_cache_hit_matches_generate(
    gemma3: LoadedModel, reference: Callable[[Job], list[int]], decode_path: str
) -> None:
    shared = [random.Random(4).randrange(FIRST_TEXT_TOKEN, 384) for _ in range(3 * SLIDING_WINDOW)]
    first, second = greedy_jobs(2, seed=5, prefix=shared)
    core = make_core(gemma3, block_size=4)
    assert_as_reference([first], run_jobs(core, [first]), reference)
    hits_before = core.block_manager.prefix_cache_hits
    assert_as_reference([second], run_jobs(core, [second]), reference)
    assert core.block_manager.prefix_cache_hits - hits_before == len(shared)
