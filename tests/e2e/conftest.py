"""Clients of the shared real server, and helpers to read SSE streams and metrics."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import ServerProcess

IDLE_DEADLINE_S = 60.0


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120.0) as client:
        yield client


@pytest.fixture(scope="session")
def openai_client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=120.0)


@pytest.fixture(scope="session")
def model_id(http: httpx.Client) -> str:
    return str(http.get("/v1/models").json()["data"][0]["id"])


def sse_payloads(lines: Iterator[str]) -> list[Any]:
    """The JSON payloads of `data:` lines up to `[DONE]` (asserted to arrive last)."""
    payloads: list[Any] = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return payloads
        payloads.append(json.loads(data))
    raise AssertionError("the stream ended without data: [DONE]")


def stream_post(client: httpx.Client, path: str, **kwargs: Any) -> list[Any]:
    with client.stream("POST", path, **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_payloads(response.iter_lines())


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus exposition `text` (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group(4))
    return total


def metrics_text(client: httpx.Client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.text


def wait_idle(client: httpx.Client) -> str:
    """Polls /metrics until nothing runs or waits; returns the last exposition."""
    deadline = time.monotonic() + IDLE_DEADLINE_S
    while True:
        text = metrics_text(client)
        busy = metric(text, "mmgpt_num_requests_running") + metric(
            text, "mmgpt_num_requests_waiting"
        )
        if busy == 0:
            return text
        assert time.monotonic() < deadline, f"requests still running: {busy}"
        time.sleep(0.05)  # poll interval


def assert_error(
    response: httpx.Response, status: int, *, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI envelope with the expected status; returns the inner error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error
