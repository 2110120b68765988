"""One streamed request against an OpenAI-compatible server, timed chunk by chunk.

The client shares the machine with the server it measures, so it is kept cheap:
aiohttp (C-accelerated HTTP parsing) on uvloop. Against a local server streaming
16,384 tokens to 32 concurrent requests, `mmgpt bench` used 1.5 s of CPU, imports
included, where httpx on the default asyncio loop used 3.5 s; every CPU second the
client spends is taken from the server under test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp

from bench.stats import RequestResult
from bench.workloads import BenchRequest

ROUTES = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "caption": "/v1/caption",
    "qa": "/v1/qa",
}


class StreamTimer:
    """Collects chunk arrival times and the token count of one streamed response."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.token_times: list[float] = []
        self.text_chunks = 0
        self.texts: list[str] = []
        self.usage_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.finished = False  # a finish_reason or [DONE] arrived
        self.error = ""

    def feed(self, event: dict[str, Any], now: float) -> None:
        if "error" in event:
            self.error = json.dumps(event["error"])[:300]
            return
        usage = event.get("usage")
        if usage:
            self.usage_tokens = usage.get("completion_tokens")
            self.prompt_tokens = usage.get("prompt_tokens")
        choices = event.get("choices") or []
        texts = [text for choice in choices if (text := chunk_text(choice))]
        if texts:
            self.token_times.append(now)
            self.text_chunks += 1
            self.texts.extend(texts)
        if any(choice.get("finish_reason") for choice in choices):
            self.finished = True

    def result(self, end: float) -> RequestResult:
        """A stream that finished before any text (EOS first) succeeded with no TTFT."""
        if self.error or not (self.token_times or self.finished):
            return RequestResult(ok=False, error=self.error or "stream ended without output")
        output_tokens = self.usage_tokens if self.usage_tokens is not None else self.text_chunks
        return RequestResult(
            ok=True,
            ttft=self.token_times[0] - self.start if self.token_times else None,
            e2e=end - self.start,
            itl=_gaps(self.token_times),
            output_tokens=output_tokens,
            prompt_tokens=self.prompt_tokens,
            text="".join(self.texts),
        )


def chunk_text(choice: dict[str, Any]) -> str:
    """Text of a streamed choice: `text` for completions, `delta.content` for chat."""
    if choice.get("text"):
        return str(choice["text"])
    delta = choice.get("delta") or {}
    return str(delta.get("content") or "")


def _gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


T = TypeVar("T")


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on uvloop where it is installed (it comes with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def session(connections: int, timeout_s: float) -> aiohttp.ClientSession:
    """One connection per request, for every server alike: llama-server closes the socket
    after a streamed response without saying so, which fails a pooled client's next request
    on it (a loopback connect costs far less than a request)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=True),
        timeout=aiohttp.ClientTimeout(total=timeout_s, connect=30.0),
        trust_env=False,  # loopback benchmarks must not go through a configured proxy
    )


def _request_kwargs(request: BenchRequest, model: str) -> dict[str, Any]:
    fields = request.fields | {"model": model}
    if request.image_png is None:
        return {"json": fields}
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, _form_value(value))
    form.add_field("image", request.image_png, filename="image.png", content_type="image/png")
    return {"data": form}


def _form_value(value: Any) -> str:
    """Multipart fields are strings; booleans and structures go as JSON literals."""
    return value if isinstance(value, str) else json.dumps(value)


async def send_request(
    client: aiohttp.ClientSession, base_url: str, model: str, request: BenchRequest
) -> RequestResult:
    """Send, read the SSE stream to its end, and time it; never raises."""
    url = base_url.rstrip("/") + ROUTES[request.api]
    start = time.perf_counter()
    timer = StreamTimer(start)
    try:
        async with client.post(url, **_request_kwargs(request, model)) as response:
            if response.status != 200:
                body = (await response.read()).decode("utf-8", "replace")
                return RequestResult(ok=False, error=f"HTTP {response.status}: {body[:300]}")
            await _read_events(response, timer)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    return timer.result(time.perf_counter())


async def _read_events(response: aiohttp.ClientResponse, timer: StreamTimer) -> None:
    async for line in response.content:  # one line at a time, as bytes
        if not line.startswith(b"data:"):
            continue
        payload = line[len(b"data:") :].strip()
        if payload == b"[DONE]":
            timer.finished = True
            return
        timer.feed(json.loads(payload), time.perf_counter())
