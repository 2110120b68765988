"""A client that goes away aborts its engine request, streaming or not."""

from __future__ import annotations

import json
import socket
import time

import httpx

from tests.conftest import ServerProcess
from tests.e2e.conftest import IDLE_DEADLINE_S, metric, metrics_text, wait_idle

MAX_TOKENS = 900
LONG = {"prompt": "the", "max_tokens": MAX_TOKENS, "ignore_eos": True}


def _counters(http: httpx.Client, endpoint: str) -> tuple[float, float]:
    text = wait_idle(http)
    left = metric(
        text, "mmgpt_request_failure_total", endpoint=endpoint, reason="client_disconnect"
    )
    return metric(text, "mmgpt_generation_tokens_total"), left


def _wait_running(http: httpx.Client) -> None:
    deadline = time.monotonic() + IDLE_DEADLINE_S
    while metric(metrics_text(http), "mmgpt_num_requests_running") < 1:
        assert time.monotonic() < deadline, "the request never started running"
        time.sleep(0.02)  # poll interval


def test_leaving_a_stream_aborts_the_request(server: ServerProcess, http: httpx.Client) -> None:
    tokens_before, left_before = _counters(http, "completions")
    with (
        httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client,
        client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response,
    ):
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["choices"]
    tokens_after, left_after = _counters(http, "completions")  # waits until nothing runs
    assert tokens_after - tokens_before < MAX_TOKENS  # stopped early, not run out
    assert left_after == left_before + 1


def test_leaving_a_plain_request_aborts_it(server: ServerProcess, http: httpx.Client) -> None:
    tokens_before, left_before = _counters(http, "chat")
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], **LONG}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {server.api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(head + body)
        _wait_running(http)
    tokens_after, left_after = _counters(http, "chat")
    assert tokens_after - tokens_before < MAX_TOKENS
    assert left_after == left_before + 1
