"""Async clients for the load tests: one request's outcome, plain or streamed, and waits.

Every request goes to 127.0.0.1 with a timeout; every loop that uses these is
bounded in count by its caller and in time by REQUEST_TIMEOUT_S and pytest-timeout.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from tests.conftest import ServerProcess
from tests.e2e.conftest import metric

REQUEST_TIMEOUT_S = 120.0
IDLE_TIMEOUT_S = 60.0
POLL_S = 0.05


@dataclass
class Outcome:
    """What one request got back, and when it ended (time.monotonic())."""

    status: int
    text: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # the envelope's inner object, for 4xx/5xx or events
    retry_after: str | None = None
    ended: float = 0.0


def client(server: ServerProcess, connections: int = 64) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=server.url, headers=server.headers, timeout=REQUEST_TIMEOUT_S, limits=limits
    )


def _text_of(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return str(choice["text"])
    if "message" in choice:
        return str(choice["message"]["content"])
    return str(choice.get("delta", {}).get("content") or "")


def _from_error(response: httpx.Response) -> Outcome:
    body = response.json()
    return Outcome(
        response.status_code,
        error=body.get("error"),
        retry_after=response.headers.get("retry-after"),
        ended=time.monotonic(),
    )


async def post(http: httpx.AsyncClient, path: str, **kwargs: Any) -> Outcome:
    """A plain request: its text (choice 0 first) or its error envelope."""
    response = await http.post(path, **kwargs)
    if response.status_code != 200:
        return _from_error(response)
    body = response.json()
    choices = body["choices"]
    return Outcome(
        200,
        "".join(_text_of(choice) for choice in choices),
        [choice["finish_reason"] for choice in choices],
        body.get("usage"),
        ended=time.monotonic(),
    )


async def stream(http: httpx.AsyncClient, path: str, **kwargs: Any) -> Outcome:
    """A streamed request read to [DONE]: the text of its chunks, or its error."""
    async with http.stream("POST", path, **kwargs) as response:
        if response.status_code != 200:
            await response.aread()
            return _from_error(response)
        outcome = Outcome(200)
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                outcome.ended = time.monotonic()
                return outcome
            _add_event(outcome, json.loads(data))
    raise AssertionError("the stream ended without data: [DONE]")


def _add_event(outcome: Outcome, event: dict[str, Any]) -> None:
    if "error" in event:
        outcome.error = event["error"]
        return
    for choice in event.get("choices", []):
        outcome.text += _text_of(choice)
        if choice.get("finish_reason"):
            outcome.finish_reasons.append(choice["finish_reason"])
    if event.get("usage"):
        outcome.usage = event["usage"]


async def metrics_text(http: httpx.AsyncClient) -> str:
    response = await http.get("/metrics")
    assert response.status_code == 200
    return response.text


async def wait_idle(http: httpx.AsyncClient) -> str:
    """Polls /metrics until no request runs or waits; returns that exposition."""
    with anyio.fail_after(IDLE_TIMEOUT_S):
        while True:
            text = await metrics_text(http)
            busy = metric(text, "mmgpt_num_requests_running")
            if busy + metric(text, "mmgpt_num_requests_waiting") == 0:
                return text
            await anyio.sleep(POLL_S)
