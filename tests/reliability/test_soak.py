"""Soak: many mixed requests in a bounded loop, and the server's resources before and after.

Text completions, chat (text and image), captions and questions, plain and
streamed, and some streams left after their first event, CONCURRENCY at a
time. Every answer is a 200 that finished (or a stream left on purpose); after
a warm-up fifth, the server's resident memory grows by less than 10%, its open
file descriptors do not grow, and its threads grow by no more than the worker
pool's concurrency (a leak would grow with the request count). `make test` runs
SOAK_REQUESTS (default 400); `make soak` runs thousands and records the result
in RELIABILITY.md (SOAK_RECORD names the file).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.api.images import data_url, encode, scene
from tests.conftest import ServerProcess
from tests.reliability import load
from tests.reliability.procstat import ProcessStats, stats

pytestmark = pytest.mark.anyio
NUM_REQUESTS = int(os.environ.get("SOAK_REQUESTS", "400"))
RECORD_PATH = os.environ.get("SOAK_RECORD")
CONCURRENCY = 8
WARMUP_FRACTION = 0.2
RSS_GROWTH_LIMIT = 0.10
# Worker threads of anyio's bounded pool stay once started: a busier moment after the
# warm-up may add up to one per concurrent request. A leak would add one per request.
THREAD_POOL_SLACK = 8
SETTLE_S = 30.0  # how long closed connections and idle worker threads may take to go
SEED = 7
KINDS = (
    "completion", "completion-stream", "chat", "chat-stream", "chat-image",
    "caption", "caption-stream", "qa", "qa-stream", "abandoned-stream",
)  # fmt: skip
MARK_BEGIN, MARK_END = "<!-- soak:begin -->", "<!-- soak:end -->"


@dataclass
class Tally:
    kinds: Counter[str]
    statuses: Counter[int]
    failures: list[str]


def _images() -> list[bytes]:
    return [encode(scene(32 + 8 * i, 32 + 4 * i)) for i in range(6)]


IMAGES = _images()


def _request(kind: str, rng: random.Random, images: list[bytes]) -> tuple[str, dict[str, Any]]:
    """The route and httpx arguments of one request of `kind`."""
    sampling = {"max_tokens": rng.randint(2, 12), "temperature": rng.choice([0, 0.8])}
    stream = kind.endswith("stream")
    image = rng.choice(images)
    if kind.startswith("completion") or kind == "abandoned-stream":
        prompt = rng.choice(["the", "a red", "two blue squares", "describe the picture"])
        return "/v1/completions", {"json": {"prompt": prompt, "stream": stream, **sampling}}
    if kind.startswith("chat"):
        content: Any = rng.choice(["hi", "name a shape", "what colour is the sky"])
        if kind == "chat-image":
            picture = {"type": "image_url", "image_url": {"url": data_url(image)}}
            content = [picture, {"type": "text", "text": content}]
        messages = [{"role": "user", "content": content}]
        return "/v1/chat/completions", {
            "json": {"messages": messages, "stream": stream, **sampling}
        }
    fields = {key: str(value) for key, value in sampling.items()} | {"stream": str(stream).lower()}
    if kind.startswith("qa"):
        fields["question"] = rng.choice(["what colour is the square?", "how many shapes?"])
    route = "/v1/qa" if kind.startswith("qa") else "/v1/caption"
    return route, {"data": fields, "files": {"image": ("scene.png", image, "image/png")}}


async def _abandon(http: httpx.AsyncClient, path: str, kwargs: dict[str, Any]) -> int:
    """Reads one event of a long stream, then leaves (the connection is closed)."""
    kwargs["json"] |= {"stream": True, "max_tokens": 200, "ignore_eos": True}
    async with http.stream("POST", path, **kwargs) as response:
        if response.status_code == 200:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break
        return response.status_code


async def _run_one(http: httpx.AsyncClient, kind: str, rng: random.Random, tally: Tally) -> None:
    path, kwargs = _request(kind, rng, IMAGES)
    tally.kinds[kind] += 1
    if kind == "abandoned-stream":
        tally.statuses[await _abandon(http, path, kwargs)] += 1
        return
    send = load.stream if kind.endswith("stream") else load.post
    outcome = await send(http, path, **kwargs)
    tally.statuses[outcome.status] += 1
    finished = set(outcome.finish_reasons) <= {"stop", "length"} and outcome.finish_reasons
    if outcome.status != 200 or outcome.error is not None or not finished:
        tally.failures.append(f"{kind}: {outcome.status} {outcome.error} {outcome.finish_reasons}")


async def _run(server: ServerProcess, count: int, seed: int, tally: Tally) -> None:
    """`count` requests, CONCURRENCY at a time, each kind drawn from a seeded generator."""
    rng = random.Random(seed)
    plan = [rng.choice(KINDS) for _ in range(count)]
    next_index = 0

    async def worker(worker_seed: int) -> None:
        nonlocal next_index
        worker_rng = random.Random(worker_seed)
        while next_index < len(plan):
            kind = plan[next_index]
            next_index += 1
            await _run_one(http, kind, worker_rng, tally)

    async with (
        load.client(server, connections=CONCURRENCY) as http,
        anyio.create_task_group() as tg,
    ):
        for index in range(CONCURRENCY):
            tg.start_soon(worker, seed * 100 + index)


async def _settled(server: ServerProcess, limit: ProcessStats | None = None) -> ProcessStats:
    """The server's stats once idle; with `limit`, waits (bounded) for its fds to fall back to
    the limit's, since the server closes a client's connections a moment after the client."""
    async with load.client(server, connections=1) as http:
        await load.wait_idle(http)
    current = stats(server.process.pid)
    deadline = time.monotonic() + SETTLE_S
    while limit is not None and time.monotonic() < deadline:
        if current.num_fds <= limit.num_fds:
            break
        await anyio.sleep(load.POLL_S * 4)
        current = stats(server.process.pid)
    return current


async def test_soak(server: ServerProcess) -> None:
    tally = Tally(Counter(), Counter(), [])
    warmup = max(CONCURRENCY, int(NUM_REQUESTS * WARMUP_FRACTION))
    started = time.monotonic()
    await _run(server, warmup, SEED, tally)
    warm = await _settled(server)
    await _run(server, NUM_REQUESTS - warmup, SEED + 1, tally)
    end = await _settled(server, limit=warm)
    seconds = time.monotonic() - started

    assert not tally.failures, tally.failures[:10]
    assert set(tally.statuses) == {200}, tally.statuses
    growth = (end.rss_bytes - warm.rss_bytes) / warm.rss_bytes
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth:.1%} after warm-up"
    assert end.num_fds <= warm.num_fds, (warm, end)
    assert end.num_threads <= warm.num_threads + THREAD_POOL_SLACK, (warm, end)
    summary = _summary(tally, warm, end, seconds)
    print("\n" + summary)
    if RECORD_PATH:
        record(Path(RECORD_PATH), summary)


def _summary(tally: Tally, warm: ProcessStats, end: ProcessStats, seconds: float) -> str:
    mib = 2**20
    mix = ", ".join(f"{kind} {count}" for kind, count in sorted(tally.kinds.items()))
    return "\n".join(
        [
            "| measure | value |",
            "| --- | --- |",
            f"| requests | {sum(tally.kinds.values())} ({CONCURRENCY} at a time, "
            f"{seconds:.0f} s) |",
            f"| mix | {mix} |",
            f"| statuses | {dict(tally.statuses)} (no 5xx) |",
            f"| RSS after warm-up / at the end | {warm.rss_bytes / mib:.0f} MiB / "
            f"{end.rss_bytes / mib:.0f} MiB "
            f"({(end.rss_bytes - warm.rss_bytes) / warm.rss_bytes:+.1%}) |",
            f"| open fds after warm-up / at the end | {warm.num_fds} / {end.num_fds} |",
            f"| threads after warm-up / at the end | {warm.num_threads} / {end.num_threads} |",
        ]
    )


def record(path: Path, summary: str) -> None:
    """Replaces the soak section of RELIABILITY.md with this run's table."""
    text = path.read_text()
    head, _, rest = text.partition(MARK_BEGIN)
    _, _, tail = rest.partition(MARK_END)
    when = time.strftime("%Y-%m-%d")
    command = f"`make soak` (SOAK_REQUESTS={NUM_REQUESTS}) on {when}, the tests' tiny LLaVA on CPU"
    path.write_text(f"{head}{MARK_BEGIN}\n{command}:\n\n{summary}\n{MARK_END}{tail}")
