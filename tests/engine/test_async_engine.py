"""AsyncEngine: streaming, stop strings, aborts, validation, lifecycle, failure isolation."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import torch

from app.engine import async_engine
from app.engine.async_engine import AsyncEngine, RequestStream
from app.engine.config import EngineConfig
from app.engine.errors import EngineNotRunningError, EngineOverloadedError, InvalidRequestError
from app.engine.sequence import ImageInput, RequestOutput, SamplingParams
from app.engine.stats import StatsSink, StatsUpdate, ignore_stats
from models.base import LoadedModel
from tests.torch_threads import intra_op_threads


def new_engine(
    loaded: LoadedModel, on_stats: StatsSink = ignore_stats, **overrides: Any
) -> AsyncEngine:
    config = EngineConfig(model=loaded.path, num_threads=1, **overrides)
    return AsyncEngine(config, loaded, on_stats)


@pytest.fixture(scope="module")
def engine(llama: LoadedModel) -> Iterator[AsyncEngine]:
    engine = new_engine(llama)
    engine.start()
    yield engine
    engine.stop()


async def collect(stream: RequestStream) -> list[RequestOutput]:
    return [output async for output in stream]


def prompt(seed: int, length: int = 20) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(length)]


async def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll a condition the engine thread makes true (no fixed sleep stands in for it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_streamed_deltas_concatenate_to_the_final_text(engine: AsyncEngine) -> None:
    async def main() -> list[list[RequestOutput]]:
        streams = [
            engine.submit(f"stream{i}", prompt(i), SamplingParams(max_tokens=40, seed=i, n=2))
            for i in range(8)
        ]
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    all_text = ""
    for outputs in run(main()):
        for index in (0, 1):
            mine = [o for o in outputs if o.index == index]
            assert mine[-1].finished and not any(o.finished for o in mine[:-1])
            token_ids = [t for o in mine for t in o.token_ids]
            final = engine.tokenizer.decode(token_ids, skip_special_tokens=True)
            emitted = ""
            for output in mine:
                emitted += output.text
                assert final.startswith(emitted)  # no replacement char that later changes
            assert emitted == final
            assert mine[-1].num_generated_tokens == len(token_ids)
            all_text += final
    assert any(len(ch.encode()) > 1 for ch in all_text)  # multi-byte characters were streamed


def test_stop_strings_and_stop_tokens_end_the_output_without_leaking(engine: AsyncEngine) -> None:
    ids = prompt(100)
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def generate(request_id: str, params: SamplingParams) -> list[RequestOutput]:
        return await collect(engine.submit(request_id, ids, params))

    full = run(generate("free", greedy))
    full_text = "".join(o.text for o in full)
    assert len(full_text) > 12
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    stop_params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
    stopped = run(generate("stopped", stop_params))
    emitted = ""
    for output in stopped:
        emitted += output.text
        assert stop not in emitted
    assert emitted == full_text[: full_text.find(stop)]
    assert stopped[-1].finish_reason == "stop"

    full_ids = [t for o in full for t in o.token_ids]
    stop_token = full_ids[5]
    token_params = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[stop_token])
    by_token = run(generate("stop-token", token_params))
    got = [t for o in by_token for t in o.token_ids]
    assert got == full_ids[: full_ids.index(stop_token) + 1]
    assert by_token[-1].finish_reason == "stop"
    expected_text = engine.tokenizer.decode(got[:-1], skip_special_tokens=True)
    assert "".join(o.text for o in by_token) == expected_text


def test_fifty_aborted_requests_free_every_block_and_the_engine_still_serves(
    engine: AsyncEngine,
) -> None:
    params = SamplingParams(max_tokens=200, ignore_eos=True)

    async def main() -> list[RequestOutput]:
        streams = [engine.submit(f"abort{i}", prompt(i), params) for i in range(50)]
        firsts = [await stream.__anext__() for stream in streams]
        assert all(not output.finished for output in firsts)
        for i, stream in enumerate(streams):
            if i % 2:
                await stream.aclose()
            else:
                engine.abort(stream.request_id)
        finals = [(await collect(stream))[-1] for stream in streams[::2]]
        assert {output.finish_reason for output in finals} == {"abort"}
        await wait_for(lambda: engine.stats().num_running == 0)
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_blocks and stats.num_waiting == 0
        assert stats.kv_cache_usage == 0.0
        return await collect(engine.submit("after-aborts", prompt(7), SamplingParams(max_tokens=5)))

    outputs = run(main())
    assert outputs[-1].finish_reason == "length"
    assert sum(len(output.token_ids) for output in outputs) == 5  # outputs may join tokens


def test_invalid_requests_are_rejected_at_submit(engine: AsyncEngine) -> None:
    async def main() -> None:
        too_long = SamplingParams(max_tokens=250)
        with pytest.raises(InvalidRequestError, match=r"256.*270|270.*256"):
            engine.submit("long", prompt(1, 20), too_long)
        for bad in (
            SamplingParams(temperature=-1.0),
            SamplingParams(top_p=0.0),
            SamplingParams(n=0),
            SamplingParams(logprobs=1000),
            SamplingParams(max_tokens=0),
            SamplingParams(stop_token_ids=[10_000]),
        ):
            with pytest.raises(InvalidRequestError):
                engine.submit("bad", prompt(1), bad)
        with pytest.raises(InvalidRequestError, match="token ids"):
            engine.submit("vocab", [1, 2, 99_999], SamplingParams())
        with pytest.raises(InvalidRequestError, match="no images"):
            engine.submit("image", prompt(1), SamplingParams(), [ImageInput(None, "x")])
        stream = engine.submit("twice", prompt(1), SamplingParams(max_tokens=3))
        with pytest.raises(InvalidRequestError, match="already in use"):
            engine.submit("twice", prompt(1), SamplingParams())
        await collect(stream)

    run(main())


def test_requests_beyond_the_kv_cache_are_rejected(llama: LoadedModel) -> None:
    engine = new_engine(llama, kv_cache_bytes=64 * llama.info.kv_bytes_per_token())
    engine.start()
    try:
        with pytest.raises(InvalidRequestError, match=r"KV cache holds 64 tokens.*needs 70"):
            run(_submit(engine, prompt(1, 30), SamplingParams(max_tokens=40)))
    finally:
        engine.stop()


async def _submit(engine: AsyncEngine, ids: list[int], params: SamplingParams) -> RequestStream:
    return engine.submit("r", ids, params)


def test_a_full_waiting_queue_overloads(llama: LoadedModel) -> None:
    engine = new_engine(llama, max_waiting_requests=0)
    engine.start()
    try:
        with pytest.raises(EngineOverloadedError):
            run(_submit(engine, prompt(1), SamplingParams()))
    finally:
        engine.stop()


def test_lifecycle_refuses_requests_when_not_running(llama: LoadedModel) -> None:
    engine = new_engine(llama)
    assert not engine.is_running and not engine.is_healthy
    with pytest.raises(EngineNotRunningError):
        run(_submit(engine, prompt(1), SamplingParams()))
    engine.start()
    engine.start()  # idempotent
    assert engine.is_running and engine.is_healthy
    outputs = run(_collect_one(engine, SamplingParams(max_tokens=3)))
    assert outputs[-1].finish_reason == "length"
    engine.stop()
    assert not engine.is_running
    with pytest.raises(EngineNotRunningError):
        run(_submit(engine, prompt(1), SamplingParams()))


async def _collect_one(engine: AsyncEngine, params: SamplingParams) -> list[RequestOutput]:
    return await collect(engine.submit("one", prompt(3), params))


@pytest.mark.parametrize(("drain_timeout", "reason"), [(60.0, "length"), (0.0, "abort")])
def test_stop_drains_for_the_timeout_then_aborts(
    llama: LoadedModel, drain_timeout: float, reason: str
) -> None:
    engine = new_engine(llama)
    engine.start()
    max_tokens = 20 if reason == "length" else 230

    async def main() -> list[RequestOutput]:
        stream = engine.submit("draining", prompt(4), SamplingParams(max_tokens=max_tokens))
        first = await stream.__anext__()
        stopper = asyncio.create_task(asyncio.to_thread(engine.stop, drain_timeout))
        rest = await collect(stream)
        await stopper
        return [first, *rest]

    outputs = run(main())
    assert outputs[-1].finish_reason == reason
    if reason == "length":
        assert sum(len(o.token_ids) for o in outputs) == max_tokens
    assert not engine.is_running


class _FailingRunner:
    """Wraps the runner: a step holding the 'poison' request raises."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def run(self, batch: Any) -> Any:
        if any(seq.request_id == "poison" for seq in batch.seqs):
            raise RuntimeError("boom")
        return self.runner.run(batch)


def test_a_failing_step_fails_only_its_requests(llama: LoadedModel) -> None:
    engine = new_engine(llama)
    engine._core.runner = _FailingRunner(engine._core.runner)  # type: ignore[assignment]
    engine.start()

    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        poisoned = await collect(engine.submit("poison", prompt(5), SamplingParams(n=2)))
        healthy = await collect(engine.submit("healthy", prompt(6), SamplingParams(max_tokens=4)))
        return poisoned, healthy

    try:
        poisoned, healthy = run(main())
        assert [o.finish_reason for o in poisoned] == ["error", "error"]
        assert all(o.error and "boom" in o.error for o in poisoned)
        assert healthy[-1].finish_reason == "length"
        assert engine.is_healthy
        assert engine.stats().num_free_blocks == engine.stats().num_blocks
    finally:
        engine.stop()


class _NaNModel:
    """Wraps the model: every other logits row is NaN."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def compute_logits(self, hidden: torch.Tensor, row_major: bool = False) -> torch.Tensor:
        logits = self.model.compute_logits(hidden, row_major)
        logits[::2] = float("nan")
        return logits


def test_nan_logits_end_the_sequence_with_an_error_not_the_engine(llama: LoadedModel) -> None:
    engine = new_engine(llama)
    engine._core.runner.model = _NaNModel(engine._core.runner.model)
    engine.start()
    try:
        outputs = run(_collect_one(engine, SamplingParams(max_tokens=4, top_p=0.9, seed=1)))
        assert outputs[-1].finish_reason == "error" and outputs[-1].error
        assert engine.is_healthy
    finally:
        engine.stop()


def test_stats_reach_the_sink_and_agree_with_the_request_timeline(llama: LoadedModel) -> None:
    updates: list[StatsUpdate] = []
    engine = new_engine(llama, updates.append)
    engine.start()
    try:
        outputs = run(_collect_one(engine, SamplingParams(max_tokens=6, ignore_eos=True)))
    finally:
        engine.stop()
    timeline = outputs[-1].metrics
    assert timeline is not None and timeline.first_token_time is not None
    assert timeline.first_scheduled_time is not None and timeline.finished_time is not None
    assert timeline.arrival_time <= timeline.first_scheduled_time <= timeline.first_token_time
    assert timeline.first_token_time <= timeline.finished_time
    (request,) = [request for update in updates for request in update.finished]
    assert request.time_to_first_token == timeline.first_token_time - timeline.arrival_time
    assert request.e2e_latency == timeline.finished_time - timeline.arrival_time
    assert (request.num_prompt_tokens, request.num_generation_tokens) == (20, 6)
    steps = [update.step for update in updates if update.step is not None]
    assert sum(step.num_generated_tokens for step in steps) == 6
    assert engine.stats() == updates[-1].engine  # what the API reads is what was recorded
    assert engine.stats().num_steps == len(steps) >= 6


def test_concurrent_submits_from_another_thread_loop(engine: AsyncEngine) -> None:
    """Two event loops (threads) share one engine; each gets its own outputs."""
    results: dict[str, list[RequestOutput]] = {}

    def in_thread(name: str) -> None:
        async def main() -> None:
            results[name] = await collect(
                engine.submit(name, prompt(8), SamplingParams(max_tokens=5, ignore_eos=True))
            )

        asyncio.run(main())

    threads = [threading.Thread(target=in_thread, args=(f"loop{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[f"loop{i}"][-1].finish_reason for i in range(2)] == ["length", "length"]


class _BlockingRunner:
    """Wraps the runner: a step holding the 'stuck' request waits for a release."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def run(self, batch: Any) -> Any:
        if any(seq.request_id == "stuck" for seq in batch.seqs):
            self.entered.set()
            assert self.release.wait(timeout=60)
        return self.runner.run(batch)


def test_a_step_that_runs_too_long_makes_the_engine_unhealthy(llama: LoadedModel) -> None:
    engine = new_engine(llama)
    runner = _BlockingRunner(engine._core.runner)
    engine._core.runner = runner  # type: ignore[assignment]
    engine.stuck_after_s = 0.2
    engine.start()

    async def main() -> list[RequestOutput]:
        stream = engine.submit("stuck", prompt(9), SamplingParams(max_tokens=3))
        await wait_for(runner.entered.is_set)
        await wait_for(lambda: not engine.is_healthy)
        assert engine.is_running
        runner.release.set()
        outputs = await collect(stream)
        await wait_for(lambda: engine.is_healthy)
        return outputs

    try:
        assert run(main())[-1].finish_reason == "length"
    finally:
        runner.release.set()
        engine.stop()


def test_stop_aborts_requests_still_waiting_for_admission(llama: LoadedModel) -> None:
    engine = new_engine(llama, max_num_seqs=1)
    engine.start()

    async def main() -> list[str | None]:
        streams = [
            engine.submit(f"queued{i}", prompt(i), SamplingParams(max_tokens=200)) for i in range(3)
        ]
        await streams[0].__anext__()
        await asyncio.to_thread(engine.stop, 0.0)
        return [(await collect(stream))[-1].finish_reason for stream in streams]

    assert run(main()) == ["abort", "abort", "abort"]


def test_the_model_loads_with_the_engines_thread_count(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading times the model's products (models/linear.py): with the threads the engine
    will step with, on the set-up thread, leaving the caller's own setting alone."""
    seen: list[tuple[str, int]] = []

    def loading(config: EngineConfig) -> LoadedModel:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return llama

    monkeypatch.setattr(async_engine, "_load", loading)
    with intra_op_threads(2):
        AsyncEngine(EngineConfig(model=llama.path, num_threads=1))
        assert torch.get_num_threads() == 2
    assert seen == [("mmgpt-setup", 1)]
