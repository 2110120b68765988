"""Serving benchmark: drive any OpenAI-compatible server and report TTFT, ITL, TPOT, E2E.

    python -m bench.serve --base-url http://127.0.0.1:8000 --workload text \\
        --num-prompts 128 --max-concurrency 32 --input-len 32 --output-len 64

Requests go out at `--request-rate` per second (Poisson arrivals; `inf` sends them
all at once), at most `--max-concurrency` in flight; each is streamed and timed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.client import run_async, send_request, session
from bench.stats import (
    BenchSummary,
    RequestResult,
    format_repeat,
    format_summary,
    repeat_ttft,
    summarize,
)
from bench.workloads import WORKLOADS, BenchRequest, WorkloadSpec, build_requests

WARMUP_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class LoadConfig:
    base_url: str
    model: str | None = None  # None: the first id GET /v1/models lists
    unlisted_model: str | None = None  # sent where the server lists none (see discover_model)
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    num_warmups: int = 0
    timeout_s: float = 600.0
    seed: int = 0


@dataclass
class BenchReport:
    label: str
    model: str
    workload: WorkloadSpec
    load: LoadConfig
    summary: BenchSummary
    errors: list[str] = field(default_factory=list)  # distinct messages, at most a few
    results: list[RequestResult] = field(default_factory=list)  # in request order

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "model": self.model,
            "workload": asdict(self.workload),
            "load": asdict(self.load) | {"request_rate": str(self.load.request_rate)},
            "summary": self.summary.to_dict(),
            "errors": self.errors,
            "requests": [_request_row(result) for result in self.results],
        }

    def notes(self) -> list[str]:
        """The repeated-image TTFT split when asked for, then the errors."""
        notes = [f"error: {message}" for message in self.errors]
        if self.workload.repeat_image > 1:
            split = repeat_ttft(self.results, self.workload.repeat_image)
            notes.insert(0, format_repeat(*split))
        return notes


def _request_row(result: RequestResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "ttft": result.ttft,
        "e2e": result.e2e,
        "output_tokens": result.output_tokens,
        "error": result.error,
        "text": result.text,
    }


async def discover_model(
    client: aiohttp.ClientSession, base_url: str, unlisted: str | None = None
) -> str:
    """The first model id the server lists, else `unlisted`: `transformers serve` (5.17)
    lists only what is in the hub cache, yet answers requests that name the folder it
    was pinned to."""
    async with client.get(base_url.rstrip("/") + "/v1/models") as response:
        response.raise_for_status()
        listed = (await response.json())["data"]
    if listed or unlisted is None:
        return str(listed[0]["id"])
    return unlisted


async def arrivals(count: int, rate: float, rng: random.Random) -> AsyncIterator[int]:
    """Yields request indices at Poisson arrival times (all at once for an infinite rate)."""
    for index in range(count):
        if index and rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
        yield index


async def run_load(
    client: aiohttp.ClientSession, load: LoadConfig, model: str, requests: Sequence[BenchRequest]
) -> tuple[list[RequestResult], float]:
    """Sends every request on the arrival schedule; returns results and wall time."""
    limit = asyncio.Semaphore(load.max_concurrency or len(requests) or 1)

    async def one(request: BenchRequest) -> RequestResult:
        async with limit:
            return await send_request(client, load.base_url, model, request)

    start = time.perf_counter()
    tasks = []
    async for index in arrivals(len(requests), load.request_rate, random.Random(load.seed)):
        tasks.append(asyncio.create_task(one(requests[index])))
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


def _client(load: LoadConfig, num_requests: int) -> aiohttp.ClientSession:
    return session(max(load.max_concurrency or num_requests, 1), load.timeout_s)


def warmup_requests(workload: WorkloadSpec, count: int) -> list[BenchRequest]:
    """Other prompts and images than the measured ones, so that no cache is warmed for them."""
    if count == 0:
        return []
    seed = workload.seed + WARMUP_SEED_OFFSET
    return build_requests(dataclasses.replace(workload, num_prompts=count, seed=seed))


async def run_benchmark(load: LoadConfig, workload: WorkloadSpec, label: str = "") -> BenchReport:
    requests = build_requests(workload)
    async with _client(load, len(requests)) as client:
        model = load.model or await discover_model(client, load.base_url, load.unlisted_model)
        for request in warmup_requests(workload, load.num_warmups):
            await send_request(client, load.base_url, model, request)
        results, duration = await run_load(client, load, model, requests)
    errors = sorted({r.error for r in results if not r.ok})[:5]
    summary = summarize(results, duration)
    return BenchReport(label or workload.name, model, workload, load, summary, errors, results)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """Workload and load options, shared with bench.compare."""
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="req/s (Poisson)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=32, help="text workload prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0, help="sent only below 1")
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true")
    parser.add_argument("--image-source", choices=["scenes", "synthetic"], default="scenes")
    parser.add_argument("--tokenizer", default=None, help="folder; exact prompt lengths")
    parser.add_argument(
        "--repeat-image", type=int, default=1, help="consecutive requests per image (caches)"
    )
    parser.add_argument("--num-warmups", type=int, default=0, help="unmeasured requests first")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")


def workload_spec(args: argparse.Namespace, name: str) -> WorkloadSpec:
    return WorkloadSpec(
        name=name,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        temperature=args.temperature,
        top_p=args.top_p,
        ignore_eos=args.ignore_eos,
        image_source=args.image_source,
        tokenizer=args.tokenizer,
        repeat_image=args.repeat_image,
    )


def load_config(args: argparse.Namespace, base_url: str, model: str | None) -> LoadConfig:
    return LoadConfig(
        base_url=base_url,
        model=model,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        num_warmups=args.num_warmups,
        timeout_s=args.timeout,
        seed=args.seed,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmgpt bench", description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id to send; default: from /v1/models")
    parser.add_argument("--workload", choices=WORKLOADS, default="text")
    add_workload_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = load_config(args, args.base_url, args.model)
    report = run_async(run_benchmark(load, workload_spec(args, args.workload)))
    print("$ mmgpt bench " + " ".join(sys.argv[1:] if argv is None else argv))
    print(format_summary(report.summary, f"{report.label} @ {args.base_url}"))
    for note in report.notes():
        print(note)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 0 if report.summary.completed else 1


if __name__ == "__main__":
    raise SystemExit(main())
