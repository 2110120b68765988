"""Engine faults: a step that raises, logits that are NaN or inf, a loop that hangs.

A failing step ends only the requests scheduled in it (500 envelope, or an error
event in a stream) and the loop keeps serving; the sampler survives any logits
and any parameters the API lets through; a stuck loop turns /ready to 503.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from typing import Any

import pytest
import torch

from app import metrics
from app.engine.async_engine import AsyncEngine, RequestStream
from app.engine.config import EngineConfig
from app.engine.sampling import Sampler
from app.engine.sequence import RequestOutput, SamplingParams, Sequence
from app.schemas import LOGPROB_FLOOR
from models import LoadedModel
from tests.e2e.conftest import assert_error
from tests.reliability.faults import (
    POISON_MAX_TOKENS,
    BadLogitsModel,
    FaultyRunner,
    in_process,
    wait_status,
)

CPU = torch.device("cpu")
BANNED = 3
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}
GREEDY_PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
NUM_ROUNDS = 12  # waves of requests, each with one poisoned request among healthy ones


def _prompt(seed: int, vocab: int, length: int = 10) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, vocab) for _ in range(length)]


# ---- the sampler ----------------------------------------------------------------------------


def _random_params(rng: random.Random, vocab: int) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 1e-6, 2e-5, 0.7, 1.0, 2.0]),
        top_k=rng.choice([-1, 0, 1, 2, vocab, vocab + 5]),
        top_p=rng.choice([1.0, 0.5, 5e-324]),
        min_p=rng.choice([0.0, 0.5, 1.0]),
        repetition_penalty=rng.choice([1.0, 5e-324, 1e-30, 10.0]),
        presence_penalty=rng.choice([-2.0, 0.0, 2.0]),
        frequency_penalty=rng.choice([-2.0, 0.0, 2.0]),
        min_tokens=rng.choice([0, 5]),
        stop_token_ids=rng.choice([[], [1], [1, 2]]),
        seed=rng.choice([None, 0, 2**64 - 1, -(2**63)]),
        logprobs=rng.choice([None, 0, 2, vocab]),
    )


def _random_logits(rng: random.Random, rows: int, vocab: int) -> tuple[torch.Tensor, list[int]]:
    """Logits with NaN/inf sprinkled in, and the rows made wholly non-finite.

    A row that is not wholly non-finite keeps its last token finite: a row whose
    only finite logits are tokens the request forbids (EOS under min_tokens, the
    banned placeholder) leaves nothing to sample, which no real vocabulary does.
    """
    seed = rng.randrange(2**31)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    logits *= rng.choice([1.0, 1e3, 1e30])  # [rows, vocab]
    for _ in range(rng.randrange(0, rows * vocab + 1)):
        value = rng.choice([math.nan, math.inf, -math.inf])
        logits[rng.randrange(rows), rng.randrange(vocab - 1)] = value
    if rng.random() < 0.2:
        logits[rng.randrange(rows)] = math.inf  # all +inf: equal large values, still a draw
    dead = [row for row in range(rows) if rng.random() < 0.2]
    for row in dead:  # nothing finite at all: reported, and a uniform draw
        logits[row] = rng.choice([math.nan, -math.inf])
    return logits, dead


def test_the_sampler_survives_non_finite_logits_and_extreme_parameters() -> None:
    """Random rows with NaN/inf logits and the most extreme parameters the API accepts."""
    rng = random.Random(0)
    sampler = Sampler(CPU, eos_token_ids=(0,), banned_token_ids=(BANNED,))
    for _ in range(300):
        vocab, rows = rng.choice([5, 17, 64]), rng.randint(1, 6)
        seqs = [
            Sequence(i, f"r{i}", 0, [*_prompt(i, vocab), BANNED], _random_params(rng, vocab))
            for i in range(rows)
        ]
        for seq in seqs:
            seq.token_ids += _prompt(rng.randrange(1000), vocab, rng.randrange(0, 4))
        logits, dead = _random_logits(rng, rows, vocab)
        out = sampler.sample(logits, seqs)
        assert len(out.token_ids) == rows
        assert set(dead) <= set(out.nonfinite_rows)
        assert all(0 <= token < vocab and token != BANNED for token in out.token_ids)
        for row in out.logprobs:
            if row is not None:
                assert not math.isnan(row.token_logprob)
                assert not any(math.isnan(value) for value in row.top_logprobs)


def test_a_penalty_that_underflows_keeps_banned_tokens_banned() -> None:
    """repetition_penalty=5e-324 is 0 in float32: a seen banned token's -inf * 0 was NaN."""
    sampler = Sampler(CPU, eos_token_ids=(0,), banned_token_ids=(BANNED,))
    logits = torch.tensor([[0.5, 1.0, 9.0, -0.5, 3.0]] * 2)  # [2, vocab]
    params = SamplingParams(temperature=0.0, repetition_penalty=5e-324, logprobs=2)
    seqs = [Sequence(i, f"r{i}", 0, [1, 2, BANNED], params) for i in range(2)]
    out = sampler.sample(logits, seqs)
    # Seen tokens 1 and 2: 1.0 / 0 -> +inf (the largest), banned token 3 stays excluded.
    assert out.token_ids == [1, 1]
    assert all(row is not None and math.isfinite(row.token_logprob) for row in out.logprobs)


# ---- a failing step, inside the engine -------------------------------------------------------


def _engine(loaded: LoadedModel, **overrides: Any) -> tuple[AsyncEngine, FaultyRunner]:
    engine = AsyncEngine(EngineConfig(model=loaded.path, num_threads=1, **overrides), loaded)
    runner = FaultyRunner(engine._core.runner)
    engine._core.runner = runner  # type: ignore[assignment]
    return engine, runner


async def _collect(stream: RequestStream) -> list[RequestOutput]:
    return [output async for output in stream]


def _token_ids(outputs: list[RequestOutput]) -> list[int]:
    return [token for output in outputs for token in output.token_ids]


def _is_poisoned(name: str) -> bool:
    wave, slot = (int(part) for part in name.removeprefix("w").split("-"))
    return slot == wave % 4


async def _faulty_rounds(
    engine: AsyncEngine, vocab: int
) -> dict[str, tuple[int, list[RequestOutput]]]:
    """Waves of three healthy requests and one poisoned one, queued together (FCFS)."""
    streams: dict[str, tuple[int, RequestStream]] = {}
    for wave in range(NUM_ROUNDS):
        for slot in range(4):
            name, seed = f"w{wave}-{slot}", wave * 4 + slot
            params = GREEDY_PARAMS
            if _is_poisoned(name):
                params = SamplingParams(temperature=0.0, max_tokens=POISON_MAX_TOKENS)
            streams[name] = (seed, engine.submit(name, _prompt(seed, vocab), params))
    results = await asyncio.gather(*(_collect(stream) for _, stream in streams.values()))
    return {
        name: (seed, outputs)
        for (name, (seed, _)), outputs in zip(streams.items(), results, strict=True)
    }


def test_step_faults_end_only_the_requests_of_their_step(tiny_gpt2: LoadedModel) -> None:
    engine, runner = _engine(tiny_gpt2, max_num_seqs=2)  # a poison shares a step with one
    vocab = tiny_gpt2.info.vocab_size
    engine.start()

    async def main() -> tuple[dict[str, tuple[int, list[RequestOutput]]], list[list[int]]]:
        reference = []
        for seed in range(NUM_ROUNDS * 4):  # each request alone, before any fault
            stream = engine.submit(f"ref{seed}", _prompt(seed, vocab), GREEDY_PARAMS)
            reference.append(_token_ids(await _collect(stream)))
        return await _faulty_rounds(engine, vocab), reference

    try:
        results, reference = asyncio.run(main())
        failed = runner.failed_request_ids
        survivors = 0
        for name, (seed, outputs) in results.items():
            assert not _is_poisoned(name) or outputs[-1].finish_reason == "error", name
            if outputs[-1].finish_reason == "error":
                assert name in failed, f"{name} failed outside a failing step"
                assert outputs[-1].error and "injected step fault" in outputs[-1].error
            else:
                survivors += 1
                assert _token_ids(outputs) == reference[seed], name
        assert survivors >= NUM_ROUNDS  # healthy requests outside the failing steps finished
        assert engine.is_healthy
        stats = engine.stats()
        assert stats.num_running == stats.num_waiting == 0
        assert stats.num_free_blocks == stats.num_blocks
    finally:
        engine.stop()


# ---- the same faults over HTTP (the app in-process, a real engine) -----------------------------

anyio_test = pytest.mark.anyio


def _failures(reason: str) -> float:
    return float(metrics.REQUEST_FAILURE.labels("completions", reason)._value.get())


def _sse_payloads(text: str) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", text
    return [json.loads(line) for line in lines[:-1]]


@anyio_test
async def test_a_failing_step_is_a_500_envelope_and_the_server_keeps_serving(
    tiny_gpt2: LoadedModel,
) -> None:
    body = {"prompt": "the red circle", **GREEDY}
    async with in_process(tiny_gpt2) as (app, client):
        runner = FaultyRunner(app.state.service.engine._core.runner)
        app.state.service.engine._core.runner = runner
        reference = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
        before = _failures("internal")

        poisoned = {**body, "max_tokens": POISON_MAX_TOKENS}
        error = assert_error(await client.post("/v1/completions", json=poisoned), 500)
        assert error["type"] == "server_error" and error["code"] == "engine_error"
        assert "injected step fault" in error["message"]

        streamed = await client.post("/v1/completions", json={**poisoned, "stream": True})
        assert streamed.status_code == 200
        last = _sse_payloads(streamed.text)[-1]
        assert last["error"]["type"] == "server_error", last

        assert _failures("internal") == before + 2
        assert (await client.get("/ready")).status_code == 200
        again = await client.post("/v1/completions", json=body)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == reference


@anyio_test
async def test_nan_and_inf_logits_never_take_the_server_down(tiny_gpt2: LoadedModel) -> None:
    body = {"prompt": "two blue squares", **GREEDY}
    async with in_process(tiny_gpt2) as (app, client):
        runner = app.state.service.engine._core.runner
        model = BadLogitsModel(runner.model)
        runner.model = model
        reference = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]

        model.mode = "nan"  # no finite logit: the sequence ends with an error, not the engine
        error = assert_error(await client.post("/v1/completions", json=body), 500)
        assert "finite" in error["message"]
        model.mode = "inf"  # every logit +inf: sanitised to equal finite values, a valid draw
        inf = await client.post("/v1/completions", json={**body, "logprobs": 2})
        assert inf.status_code == 200, inf.text
        model.mode = "peak"  # -inf logprobs, which JSON cannot carry, are sent as a floor
        peak = await client.post("/v1/completions", json={**body, "logprobs": 2})
        assert peak.status_code == 200, peak.text
        logprobs = peak.json()["choices"][0]["logprobs"]
        assert logprobs["token_logprobs"][0] == 0.0
        assert sorted(logprobs["top_logprobs"][0].values()) == [LOGPROB_FLOOR, 0.0]
        chat = {"messages": [{"role": "user", "content": "hi"}], **GREEDY, "logprobs": True}
        peak_chat = await client.post("/v1/chat/completions", json={**chat, "top_logprobs": 2})
        assert peak_chat.status_code == 200, peak_chat.text
        entry = peak_chat.json()["choices"][0]["logprobs"]["content"][0]
        assert [top["logprob"] for top in entry["top_logprobs"]] == [0.0, LOGPROB_FLOOR]
        model.mode = None
        again = await client.post("/v1/completions", json=body)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == reference
        assert (await client.get("/ready")).status_code == 200


@anyio_test
async def test_a_stuck_engine_loop_turns_ready_to_503_until_it_moves(
    tiny_gpt2: LoadedModel,
) -> None:
    async with in_process(tiny_gpt2) as (app, client):
        engine = app.state.service.engine
        runner = FaultyRunner(engine._core.runner)
        engine._core.runner = runner
        engine.stuck_after_s = 1.0
        runner.hold()
        body = {"prompt": "a", **GREEDY}
        in_flight = asyncio.create_task(client.post("/v1/completions", json=body))
        try:
            stuck = await wait_status(client, "/ready", 503)
            assert "no progress" in assert_error(stuck, 503)["message"]
            assert runner.entered_hold.is_set()
            refused = await client.post("/v1/completions", json={"prompt": "b", **GREEDY})
            assert assert_error(refused, 503)["code"] == "not_ready"
        finally:
            runner.release()
        await wait_status(client, "/ready", 200)
        assert (await in_flight).status_code == 200
