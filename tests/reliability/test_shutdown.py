"""Graceful shutdown under load (tests/e2e/test_shutdown.py has the one-stream case).

On SIGTERM, with requests of every kind in flight: /ready answers 503 at once
while /health stays 200, new requests get 503 + Retry-After, every request in
flight finishes whole, and the process exits 0. With a drain timeout shorter
than the work, what is left is aborted (a 503 envelope, or an error event in a
stream: never a bare 500 from a cancelled handler) and the process still exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.api.images import scene_png
from tests.conftest import ServerProcess, make_tiny_llava_dir, start_server
from tests.e2e.conftest import metric
from tests.reliability import load

pytestmark = pytest.mark.anyio
EXIT_LIMIT_S = 90.0
SHORT_DRAIN_S = 1.0
LONG_WORK_TOKENS = 8000  # far more than a tiny model decodes in SHORT_DRAIN_S + the final grace
GREEDY: dict[str, Any] = {"temperature": 0, "ignore_eos": True}


@pytest.fixture
def draining_server(
    request: pytest.FixtureRequest, tiny_llava_dir: Path, tmp_path: Path
) -> Iterator[ServerProcess]:
    """A server with drain_timeout=param; a long context when the drain is short, so that
    the work in flight certainly outlasts it."""
    drain_timeout: float = request.param
    model = tiny_llava_dir
    if drain_timeout == SHORT_DRAIN_S:
        model = make_tiny_llava_dir(tmp_path / "long-context", context=LONG_WORK_TOKENS + 200)
    process = start_server(model, tmp_path, drain_timeout=drain_timeout, log_level="info")
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def _in_flight(http: httpx.AsyncClient, max_tokens: int) -> list[Any]:
    """Five requests of every shape, each generating max_tokens tokens."""
    text = {"prompt": "a long story", "max_tokens": max_tokens, **GREEDY}
    form = {"max_tokens": str(max_tokens - 100), "temperature": "0", "ignore_eos": "true"}
    image = {"image": ("scene.png", scene_png(), "image/png")}
    return [
        load.stream(http, "/v1/completions", json={**text, "stream": True}),
        load.post(http, "/v1/completions", json=text),
        load.stream(
            http, "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "go on"}], **text, "stream": True},
        ),
        load.stream(http, "/v1/caption", data={**form, "stream": "true"}, files=image),
        load.post(http, "/v1/qa", data={**form, "question": "what?"}, files=image),
    ]  # fmt: skip


async def _wait_running(http: httpx.AsyncClient, count: int) -> None:
    with anyio.fail_after(load.IDLE_TIMEOUT_S):
        while metric(await load.metrics_text(http), "mmgpt_num_requests_running") < count:
            await anyio.sleep(load.POLL_S)


async def _wait_exit(server: ServerProcess) -> tuple[int, float]:
    started = time.monotonic()
    code = await anyio.to_thread.run_sync(server.process.wait, EXIT_LIMIT_S)
    return code, time.monotonic() - started


@pytest.mark.parametrize("draining_server", [60.0], indirect=True)
async def test_sigterm_lets_every_request_in_flight_finish(draining_server: ServerProcess) -> None:
    server, max_tokens = draining_server, 300
    async with load.client(server) as http, httpx.AsyncClient(base_url=server.url) as probe:
        tasks = [asyncio.create_task(request) for request in _in_flight(http, max_tokens)]
        await _wait_running(probe, len(tasks))
        server.process.send_signal(signal.SIGTERM)

        with anyio.fail_after(load.IDLE_TIMEOUT_S):
            while (await probe.get("/ready")).status_code == 200:
                await anyio.sleep(0.01)
        assert (await probe.get("/health")).status_code == 200
        late = await probe.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert int(late.headers["retry-after"]) >= 1

        outcomes = await asyncio.gather(*tasks)
    for outcome in outcomes:  # "length": each ran to its max_tokens, none was cut
        assert outcome.status == 200 and outcome.error is None, outcome
        assert outcome.finish_reasons == ["length"], outcome
    code, _ = await _wait_exit(server)
    assert code == 0, server.log_tail()
    assert "draining" in server.log_tail(400)


@pytest.mark.parametrize("draining_server", [SHORT_DRAIN_S], indirect=True)
async def test_a_drain_timeout_ends_what_is_left_and_exits_zero(
    draining_server: ServerProcess,
) -> None:
    server = draining_server
    async with load.client(server) as http, httpx.AsyncClient(base_url=server.url) as probe:
        tasks = [asyncio.create_task(request) for request in _in_flight(http, LONG_WORK_TOKENS)]
        await _wait_running(probe, len(tasks))
        server.process.send_signal(signal.SIGTERM)
        code, seconds = await _wait_exit(server)
        outcomes = await asyncio.gather(*tasks)
    assert code == 0, server.log_tail()
    assert seconds < EXIT_LIMIT_S
    for outcome in outcomes:  # a 503 envelope, or an error event closing the stream
        assert outcome.status in (200, 503) and outcome.error is not None, outcome
        assert outcome.error["code"] == "aborted", outcome.error
    assert "Drain timeout" in server.log_tail(400)
