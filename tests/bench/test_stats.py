"""Percentiles and the benchmark summary, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from bench.stats import (
    Distribution,
    RequestResult,
    format_summary,
    percentile,
    repeat_ttft,
    summarize,
)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([4.0, 1.0, 3.0, 2.0], 90, 3.7),  # rank 2.7: 3 + 0.7 * (4 - 3), unsorted input
        (list(range(101)), 99, 99.0),
    ],
)
def test_percentile_interpolates_between_order_statistics(
    values: list[float], q: float, expected: float
) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50))


def test_distribution_is_in_milliseconds() -> None:
    dist = Distribution.of_seconds([0.1, 0.2, 0.3])
    assert dist.mean == pytest.approx(200.0)
    assert dist.p50 == pytest.approx(200.0)


def test_tpot_excludes_the_first_token() -> None:
    result = RequestResult(ok=True, ttft=0.1, e2e=0.5, output_tokens=5)
    assert result.tpot == pytest.approx(0.1)  # 0.4 s over the 4 tokens after the first
    assert RequestResult(ok=True, ttft=0.1, e2e=0.2, output_tokens=1).tpot is None


def test_summary_counts_only_successful_requests() -> None:
    results = [
        RequestResult(ok=True, ttft=0.1, e2e=1.1, itl=[0.5, 0.5], output_tokens=3, prompt_tokens=7),
        RequestResult(ok=True, ttft=0.3, e2e=0.7, itl=[0.4], output_tokens=2, prompt_tokens=7),
        RequestResult(ok=True, ttft=None, e2e=0.2, output_tokens=0),  # EOS first: no TTFT
        RequestResult(ok=False, error="HTTP 503"),
    ]
    summary = summarize(results, duration_s=2.0)
    assert (summary.completed, summary.errors) == (3, 1)
    assert summary.total_output_tokens == 5
    assert summary.total_prompt_tokens == 14
    assert summary.output_throughput == pytest.approx(2.5)
    assert summary.request_throughput == pytest.approx(1.5)
    assert summary.ttft.mean == pytest.approx(200.0)  # (100 + 300) / 2, the EOS-first one left out
    assert summary.tpot.mean == pytest.approx(450.0)  # (1.0 / 2 + 0.4 / 1) / 2 s
    assert summary.itl.p50 == pytest.approx(500.0)
    assert summary.e2e.p99 == pytest.approx(1000 * percentile([1.1, 0.7, 0.2], 99))
    assert summary.mean_output_tokens == pytest.approx(5 / 3)


def test_summary_table_names_every_metric() -> None:
    results = [RequestResult(ok=True, ttft=0.1, e2e=0.3, itl=[0.1, 0.1], output_tokens=3)]
    table = format_summary(summarize(results, 1.0), "text")
    for label in ("TTFT", "TPOT", "ITL", "E2E", "Output token throughput", "Failed requests"):
        assert label in table


def test_repeat_ttft_splits_first_requests_per_image_from_the_rest() -> None:
    ttfts = [0.9, 0.1, 0.2, 0.7, 0.3, 0.1]  # images of 3 requests each: 0.9 and 0.7 come first
    results = [RequestResult(ok=True, ttft=t, e2e=1.0, output_tokens=2) for t in ttfts]
    first, later = repeat_ttft(results, repeat=3)
    assert first.p50 == pytest.approx(800.0)
    assert later.p50 == pytest.approx(150.0)
