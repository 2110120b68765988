"""Per-request results and the latency/throughput summary computed from them.

Definitions (the ones vLLM's `bench serve` uses):
- TTFT: request sent -> first chunk that carries output text (none if EOS came first).
- ITL: gap between consecutive text-carrying chunks of one request.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request; requests with one token have none.
- E2E: request sent -> stream closed.
Throughputs divide by the wall time of the whole measured run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestResult:
    """What one request measured; times in seconds."""

    ok: bool
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str = ""
    text: str = ""  # the output text, to compare contenders' outputs

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between order statistics."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Distribution:
    """Mean and tail of one latency, in milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Distribution:
        millis = [1000.0 * v for v in values]
        mean = sum(millis) / len(millis) if millis else math.nan
        return cls(mean, percentile(millis, 50), percentile(millis, 90), percentile(millis, 99))


@dataclass(frozen=True)
class BenchSummary:
    completed: int
    errors: int
    duration_s: float
    total_output_tokens: int
    total_prompt_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution

    @property
    def mean_output_tokens(self) -> float:
        return self.total_output_tokens / self.completed if self.completed else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"mean_output_tokens": self.mean_output_tokens}


def summarize(results: Sequence[RequestResult], duration_s: float) -> BenchSummary:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    return BenchSummary(
        completed=len(done),
        errors=len(results) - len(done),
        duration_s=duration_s,
        total_output_tokens=output_tokens,
        total_prompt_tokens=sum(r.prompt_tokens or 0 for r in done),
        request_throughput=len(done) / duration_s if duration_s > 0 else math.nan,
        output_throughput=output_tokens / duration_s if duration_s > 0 else math.nan,
        ttft=Distribution.of_seconds([r.ttft for r in done if r.ttft is not None]),
        tpot=Distribution.of_seconds([t for r in done if (t := r.tpot) is not None]),
        itl=Distribution.of_seconds([gap for r in done for gap in r.itl]),
        e2e=Distribution.of_seconds([r.e2e for r in done]),
    )


def format_summary(summary: BenchSummary, title: str) -> str:
    """A fixed-width table, the way the serving benchmarks print theirs."""
    lines = [
        f"{'=' * 22} {title} {'=' * 22}",
        f"{'Successful requests:':<34}{summary.completed:>12}",
        f"{'Failed requests:':<34}{summary.errors:>12}",
        f"{'Benchmark duration (s):':<34}{summary.duration_s:>12.2f}",
        f"{'Total output tokens:':<34}{summary.total_output_tokens:>12}",
        f"{'Mean output tokens / request:':<34}{summary.mean_output_tokens:>12.1f}",
        f"{'Request throughput (req/s):':<34}{summary.request_throughput:>12.2f}",
        f"{'Output token throughput (tok/s):':<34}{summary.output_throughput:>12.2f}",
        f"{'(ms)':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name in ("ttft", "tpot", "itl", "e2e"):
        dist: Distribution = getattr(summary, name)
        lines.append(
            f"{name.upper():<10}{dist.mean:>10.2f}{dist.p50:>10.2f}{dist.p90:>10.2f}{dist.p99:>10.2f}"
        )
    return "\n".join(lines)


def repeat_ttft(results: Sequence[RequestResult], repeat: int) -> tuple[Distribution, Distribution]:
    """TTFT of the first request about each image, and of the `repeat - 1` that follow it."""
    first = [r.ttft for i, r in enumerate(results) if i % repeat == 0 and r.ttft is not None]
    later = [r.ttft for i, r in enumerate(results) if i % repeat != 0 and r.ttft is not None]
    return Distribution.of_seconds(first), Distribution.of_seconds(later)


def format_repeat(first: Distribution, later: Distribution) -> str:
    ratio = first.p50 / later.p50 if later.p50 > 0 else math.nan
    return (
        f"TTFT p50, first request per image: {first.p50:.2f} ms; "
        f"later requests: {later.p50:.2f} ms ({ratio:.2f}x lower)"
    )
