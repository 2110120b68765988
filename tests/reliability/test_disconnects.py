"""A disconnect storm: 200 clients that drop at random points (seeded).

Streams left after a random number of events (a reset or a close), requests
whose body never finished arriving, requests left before any answer. Afterwards
no request runs or waits, no KV block is held by a live request (cached-but-free
prefix blocks aside), the generated tokens show the work was stopped rather than
run out, the server's sockets are closed, and a fresh request gives the same
text as before the storm.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import anyio
import httpx
import pytest

from tests.api.images import scene_png
from tests.conftest import ServerProcess
from tests.e2e.conftest import metric
from tests.reliability import load
from tests.reliability.procstat import num_fds

pytestmark = pytest.mark.anyio
NUM_CLIENTS = 200
MAX_TOKENS = 900  # a client that stays would run long: dropping must stop the work
SEED = 20240601
READ_LIMIT_S = 60.0
FD_SLACK = 4  # the test's own pooled connections come and go
GREEDY: dict[str, Any] = {"temperature": 0, "ignore_eos": True}


def raw_request(server: ServerProcess, path: str, **kwargs: Any) -> bytes:
    """An HTTP/1.1 request as bytes (httpx builds the body and headers; no pooling)."""
    request = httpx.Request("POST", f"{server.url}{path}", headers=server.headers, **kwargs)
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    head += [f"{name}: {value}" for name, value in request.headers.items() if name != "host"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + request.read()


def storm_request(server: ServerProcess, rng: random.Random) -> bytes:
    prompt = f"client {rng.randrange(10**6)} sees"  # distinct prompts: no shared prefix luck
    kind = rng.choice(["completion", "chat", "caption"])
    if kind == "completion":
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True, **GREEDY}
        return raw_request(server, "/v1/completions", json=body)
    if kind == "chat":
        messages = [{"role": "user", "content": prompt}]
        body = {"messages": messages, "max_tokens": MAX_TOKENS, "stream": True, **GREEDY}
        return raw_request(server, "/v1/chat/completions", json=body)
    fields = {"prompt": prompt, "max_tokens": str(MAX_TOKENS - 100), "stream": "true"}
    files = {"image": ("scene.png", scene_png(), "image/png")}
    return raw_request(server, "/v1/caption", data=fields | {"temperature": "0"}, files=files)


async def drop_somewhere(server: ServerProcess, seed: int) -> str:
    """One client: sends a request, then leaves at a point chosen by `seed`. Returns how."""
    rng = random.Random(seed)
    request = storm_request(server, rng)
    how = rng.choice(["mid-stream", "mid-stream", "mid-stream", "half-body", "unanswered"])
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        if how == "half-body":
            writer.write(request[: len(request) - rng.randrange(1, 200)])
        else:
            writer.write(request)
        await writer.drain()
        if how == "mid-stream":
            with anyio.fail_after(READ_LIMIT_S):
                await _read_events(reader, rng.randrange(1, 25))
    finally:
        if rng.random() < 0.5:
            writer.transport.abort()  # a reset
        else:
            writer.close()  # an orderly close
    return how


async def _read_events(reader: asyncio.StreamReader, count: int) -> None:
    received = b""
    while received.count(b"data: ") < count:
        chunk = await reader.read(4096)
        assert chunk, f"the server closed the stream early: {received[:300]!r}"
        assert b"[DONE]" not in chunk, "a stream finished before its client left"
        received += chunk


async def _counters(http: httpx.AsyncClient) -> tuple[float, float]:
    text = await load.wait_idle(http)
    tokens = metric(text, "mmgpt_generation_tokens_total")
    left = metric(text, "mmgpt_request_failure_total", reason="client_disconnect")
    return tokens, left


async def _wait_fds(pid: int, limit: int) -> int:
    with anyio.fail_after(READ_LIMIT_S):
        while (count := num_fds(pid)) > limit:
            await anyio.sleep(load.POLL_S)
    return count


async def test_two_hundred_clients_drop_at_random_points(server: ServerProcess) -> None:
    body = {"prompt": "a red circle", "max_tokens": 24, **GREEDY}
    async with load.client(server, connections=2) as http:
        reference = await load.post(http, "/v1/completions", json=body)
        assert reference.status == 200
        tokens_before, left_before = await _counters(http)
        fds_before = num_fds(server.process.pid)

        hows = await asyncio.gather(*(drop_somewhere(server, SEED + i) for i in range(NUM_CLIENTS)))

        text = await load.wait_idle(http)  # bounded: fails if requests keep running
        assert metric(text, "mmgpt_kv_cache_usage_ratio") == 0.0
        tokens_after, left_after = await _counters(http)
        counts = Counter(hows)
        assert tokens_after - tokens_before < NUM_CLIENTS * MAX_TOKENS / 10  # stopped early
        assert left_after - left_before >= counts["mid-stream"]
        await _wait_fds(server.process.pid, fds_before + FD_SLACK)

        after = await load.post(http, "/v1/completions", json=body)
        assert after.status == 200 and after.text == reference.text
        print(f"\ndisconnect storm: {dict(counts)}; {tokens_after - tokens_before:.0f} tokens")
