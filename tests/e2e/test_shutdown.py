"""SIGTERM drains: /ready and new requests get 503, the request in flight finishes, exit 0."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, start_server
from tests.e2e.conftest import assert_error

MAX_TOKENS = 900
DEADLINE_S = 60.0


@pytest.fixture
def own_server(tiny_llava_dir: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    process = start_server(tiny_llava_dir, tmp_path, drain_timeout=DEADLINE_S)
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def _wait_not_ready(url: str) -> httpx.Response:
    deadline = time.monotonic() + DEADLINE_S
    while (response := httpx.get(f"{url}/ready")).status_code == 200:
        assert time.monotonic() < deadline, "/ready stayed 200 after SIGTERM"
        time.sleep(0.01)  # poll interval
    return response


def test_sigterm_drains_then_exits_zero(own_server: ServerProcess) -> None:
    body = {"prompt": "the", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with (
        httpx.Client(base_url=own_server.url, timeout=DEADLINE_S) as client,
        client.stream("POST", "/v1/completions", json=body) as in_flight,
    ):
        lines = in_flight.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it is running
        own_server.process.send_signal(signal.SIGTERM)

        assert_error(_wait_not_ready(own_server.url), 503)
        refused = httpx.post(f"{own_server.url}/v1/completions", json={"prompt": "late"})
        assert assert_error(refused, 503)["code"] == "shutting_down"
        assert refused.headers["retry-after"]

        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        payloads = [json.loads(data) for data in rest[:-1]]
        assert payloads[-1]["usage"]["completion_tokens"] == MAX_TOKENS  # not cut off
        assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert own_server.process.wait(DEADLINE_S) == 0, own_server.log_tail()


def test_a_model_that_fails_to_load_ends_the_process(tmp_path: Path) -> None:
    broken = tmp_path / "broken-checkpoint"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    process = start_server(broken, tmp_path)
    assert process.process.wait(DEADLINE_S) == 1, process.log_tail()
    assert "failed to load" in process.log_tail()
