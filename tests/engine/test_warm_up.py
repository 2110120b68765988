"""The start-up warm-up step: full-size, invisible afterwards (same outputs, no metric, no
cached image, no block taken), and run by the server's engine unless switched off; a
native-resolution model's warm-up sends one small image through the packed tower."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import async_engine
from app.engine.async_engine import AsyncEngine
from app.engine.config import EngineConfig
from app.engine.engine_core import EngineCore
from app.engine.sequence import SamplingParams
from app.engine.warm_up import MAX_PROMPT_TOKENS
from models.base import LoadedModel
from tests.engine.drive import Job, load, make_core, run_jobs
from tests.engine.qwen_vl_reference import QwenVLReference
from tests.engine.test_engine_images import random_image_jobs
from tests.engine.test_engine_qwen_vl import greedy, requests
from tests.qwen_vl_checkpoints import MIN_PIXELS, TOKEN_PIXELS, make_tiny_qwen_vl

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _text_jobs() -> list[Job]:
    prompts = [[5 + (7 * i + j) % 300 for j in range(9 + 5 * i)] for i in range(4)]
    return [Job(prompt, GREEDY) for prompt in prompts]


def _forward_sizes(core: EngineCore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the number of tokens of every forward pass of the core's model."""
    sizes: list[int] = []
    model = core.runner.model
    real = model.forward

    def counting(input_ids: torch.Tensor, *args: Any) -> torch.Tensor:
        sizes.append(input_ids.shape[0])
        return real(input_ids, *args)

    monkeypatch.setattr(model, "forward", counting)
    return sizes


def test_text_warm_up_fills_the_budget_and_changes_no_output(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = run_jobs(make_core(llama), _text_jobs())
    core = make_core(llama, max_num_batched_tokens=700)
    sizes = _forward_sizes(core, monkeypatch)
    assert core.warm_up() == 700
    assert sizes == [700]  # one step: prompts of 256 (the context), 256 and 188 tokens
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    assert core.num_steps == 0 and not core.has_unfinished
    got = run_jobs(core, _text_jobs())
    assert [[s.token_ids for s in job] for job in got] == [
        [s.token_ids for s in job] for job in expected
    ]


def test_image_warm_up_encodes_a_batch_and_leaves_no_cached_image(
    llava: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = random_image_jobs(llava, 5, seed=3)
    expected = run_jobs(make_core(llava), jobs)
    core = make_core(llava)
    batches: list[int] = []
    real = core.runner.model.encode_images

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        batches.append(pixels.shape[0])
        return real(pixels)

    monkeypatch.setattr(core.runner.model, "encode_images", counting)
    ran = core.warm_up()
    per_prompt = min(2 * llava.info.image_seq_length, MAX_PROMPT_TOKENS)
    assert batches == [ran // per_prompt + (ran % per_prompt > 0)] and batches[0] > 1
    cache = core.runner.image_cache
    assert len(cache) == 0 and cache.queries == 0 and cache.hits == 0
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    got = run_jobs(core, random_image_jobs(llava, 5, seed=3))
    assert [[s.token_ids for s in job] for job in got] == [
        [s.token_ids for s in job] for job in expected
    ]


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory: pytest.TempPathFactory) -> QwenVLReference:
    folder = make_tiny_qwen_vl(tmp_path_factory.mktemp("qwen3_vl"), family="qwen3_vl")
    return QwenVLReference(load(Path(folder)))


def test_native_resolution_warm_up_encodes_one_small_image_and_leaves_no_trace(
    qwen3_vl: QwenVLReference, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [qwen3_vl.job(request, greedy()) for request in requests(qwen3_vl)]
    expected = run_jobs(make_core(qwen3_vl.loaded), jobs)
    core = make_core(qwen3_vl.loaded)
    encoded: list[list[int]] = []  # per tower call, the images' token counts
    real = core.runner.model.encode_image_batch

    def counting(images: Sequence[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
        embeds = real(images)
        encoded.append([embed.shape[0] for embed in embeds])
        return embeds

    monkeypatch.setattr(core.runner.model, "encode_image_batch", counting)
    assert core.warm_up() == core.config.max_num_batched_tokens
    assert encoded == [[MIN_PIXELS // TOKEN_PIXELS]]  # the processor's smallest image
    cache = core.runner.image_cache
    assert len(cache) == 0 and cache.queries == 0 and cache.hits == 0
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    got = run_jobs(core, jobs)
    assert [[s.token_ids for s in job] for job in got] == [
        [s.token_ids for s in job] for job in expected
    ]


def test_a_cache_smaller_than_a_step_is_warmed_as_far_as_it_goes(llama: LoadedModel) -> None:
    bytes_per_block = 16 * llama.info.kv_bytes_per_token()
    core = make_core(llama, kv_cache_bytes=3 * bytes_per_block)  # 48 tokens of cache
    assert 0 < core.warm_up() <= 48


def test_the_warm_up_step_keeps_to_the_sequence_cap(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = make_core(llama, max_num_seqs=1, max_num_batched_tokens=2048)
    sizes = _forward_sizes(core, monkeypatch)
    longest = min(MAX_PROMPT_TOKENS, core.max_model_len)  # this model's context: 256
    assert core.warm_up() == longest and sizes == [longest]


@pytest.mark.parametrize("enabled", [True, False])
def test_the_server_engine_warms_up_unless_told_not_to(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    calls: list[int] = []
    real = EngineCore.warm_up

    def counting(core: EngineCore) -> int:
        calls.append(1)
        return real(core)

    monkeypatch.setattr(async_engine.EngineCore, "warm_up", counting)
    AsyncEngine(EngineConfig(model=llama.path, num_threads=1, warm_up=enabled), llama)
    assert calls == ([1] if enabled else [])
