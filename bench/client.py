"""One streamed request against an OpenAI-compatible server, timed chunk by chunk."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import httpx

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
        if any(chunk_text(choice) for choice in choices):
            self.token_times.append(now)
            self.text_chunks += 1
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
        )


def chunk_text(choice: dict[str, Any]) -> str:
    """Text of a streamed choice: `text` for completions, `delta.content` for chat."""
    if choice.get("text"):
        return str(choice["text"])
    delta = choice.get("delta") or {}
    return str(delta.get("content") or "")


def _gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def _request_kwargs(request: BenchRequest, model: str) -> dict[str, Any]:
    fields = request.fields | {"model": model}
    if request.image_png is None:
        return {"json": fields}
    form = {key: _form_value(value) for key, value in fields.items()}
    return {"data": form, "files": {"image": ("image.png", request.image_png, "image/png")}}


def _form_value(value: Any) -> str:
    """Multipart fields are strings; booleans and structures go as JSON literals."""
    return value if isinstance(value, str) else json.dumps(value)


async def send_request(
    client: httpx.AsyncClient, base_url: str, model: str, request: BenchRequest
) -> RequestResult:
    """Send, read the SSE stream to its end, and time it; never raises."""
    url = base_url.rstrip("/") + ROUTES[request.api]
    start = time.perf_counter()
    timer = StreamTimer(start)
    try:
        async with client.stream("POST", url, **_request_kwargs(request, model)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                return RequestResult(ok=False, error=f"HTTP {response.status_code}: {body[:300]}")
            await _read_events(response, timer)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    return timer.result(time.perf_counter())


async def _read_events(response: httpx.Response, timer: StreamTimer) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            timer.finished = True
            return
        timer.feed(json.loads(payload), time.perf_counter())
