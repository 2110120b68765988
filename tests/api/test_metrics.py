"""app/metrics.py: the engine's stats and the service's events turned into series."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client import REGISTRY

from app import metrics
from app.engine.stats import EngineStats, FinishedRequestStats, StatsUpdate, StepStats
from app.errors import CLIENT_CLOSED_REQUEST
from models import LoadedModel
from tests.api.test_text_model import gpt2, serving
from tests.e2e.conftest import metric

__all__ = ["gpt2"]  # the module's loaded text model, reused

IDLE = EngineStats(
    num_running=0, num_waiting=0, kv_cache_usage=0.0, num_blocks=8, num_free_blocks=8,
    decode_mirror_bytes=0, prefix_cache_queries=0, prefix_cache_hits=0, image_cache_queries=0,
    image_cache_hits=0, num_preemptions=0, num_steps=0, last_step_end=0.0,
)  # fmt: skip


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_engine_state_sets_the_gauges() -> None:
    busy = dataclasses.replace(
        IDLE, num_running=3, num_waiting=5, kv_cache_usage=0.25, decode_mirror_bytes=4096
    )
    metrics.EngineStatsRecorder().record(StatsUpdate(busy))
    assert sample("mmgpt_num_requests_running") == 3
    assert sample("mmgpt_num_requests_waiting") == 5
    assert sample("mmgpt_kv_cache_usage_ratio") == 0.25
    assert sample("mmgpt_decode_mirror_bytes") == 4096
    metrics.EngineStatsRecorder().record(StatsUpdate(IDLE))
    assert sample("mmgpt_num_requests_running") == sample("mmgpt_kv_cache_usage_ratio") == 0


def test_counters_take_only_the_growth_of_each_engine() -> None:
    before = sample("mmgpt_prefix_cache_hits_total"), sample("mmgpt_num_preemptions_total")
    first, second = metrics.EngineStatsRecorder(), metrics.EngineStatsRecorder()
    for hits, preemptions in ((10, 1), (10, 1), (15, 3)):
        state = dataclasses.replace(IDLE, prefix_cache_hits=hits, num_preemptions=preemptions)
        first.record(StatsUpdate(state))
    second.record(StatsUpdate(dataclasses.replace(IDLE, prefix_cache_hits=4)))  # its own count
    after = sample("mmgpt_prefix_cache_hits_total"), sample("mmgpt_num_preemptions_total")
    assert (after[0] - before[0], after[1] - before[1]) == (19, 3)


def test_a_step_observes_its_time_and_tokens() -> None:
    names = ("mmgpt_engine_step_seconds_count", "mmgpt_batch_tokens_sum")
    before = [sample(name) for name in (*names, "mmgpt_generation_tokens_total")]
    metrics.EngineStatsRecorder().record(StatsUpdate(IDLE, StepStats(0.004, 96, 7)))
    after = [sample(name) for name in (*names, "mmgpt_generation_tokens_total")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 96, 7]


def test_a_finished_request_observes_the_spans_it_reached() -> None:
    spans = (
        "time_to_first_token_seconds", "request_queue_time_seconds", "e2e_request_latency_seconds",
        "request_prefill_time_seconds", "request_decode_time_seconds",
        "inter_token_latency_seconds", "request_prompt_tokens", "request_generation_tokens",
    )  # fmt: skip

    def counts() -> list[float]:
        return [sample(f"mmgpt_{name}_count") for name in spans]

    ran = FinishedRequestStats(12, 3, 2.5, 0.5, 1.0, 0.5, 1.0, (0.25, 0.75))
    never_scheduled = FinishedRequestStats(12, 0, 2.0, None, None, None, None, ())
    prompt_tokens = sample("mmgpt_prompt_tokens_total")
    before = counts()
    metrics.EngineStatsRecorder().record(StatsUpdate(IDLE, None, (ran, never_scheduled)))
    grown = [after - earlier for after, earlier in zip(counts(), before, strict=True)]
    assert grown == [1, 1, 2, 1, 1, 2, 2, 2]
    assert sample("mmgpt_prompt_tokens_total") - prompt_tokens == 24


@pytest.mark.parametrize(
    ("route", "status", "code", "reason"),
    [
        ("/v1/chat/completions", 503, "overloaded", "overloaded"),
        ("/v1/engines/{engine}/completions", 503, "not_ready", "not_ready"),
        ("/v1/caption", 413, "too_large", "too_large"),
        ("/v1/completions", 200, None, None),
        ("/v1/completions", CLIENT_CLOSED_REQUEST, None, None),  # the route counts those
        ("/v1/models", 401, "invalid_api_key", None),  # not a generating route
    ],
)
def test_an_http_request_counts_by_route_and_a_refused_generation_by_reason(
    route: str, status: int, code: str | None, reason: str | None
) -> None:
    endpoint = metrics.GENERATING_ROUTES.get(route, "completions")

    def counts() -> tuple[float, float]:
        failures = sum(
            sample("mmgpt_request_failure_total", endpoint=endpoint, reason=each)
            for each in metrics.FAILURE_REASONS
        )
        return sample("mmgpt_http_requests_total", route=route, status=str(status)), failures

    before = counts()
    metrics.record_http_request(route, status, code)
    after = counts()
    assert after[0] == before[0] + 1
    assert after[1] == before[1] + (reason is not None)
    if reason is not None:
        assert reason in metrics.FAILURE_REASONS


@pytest.mark.anyio
async def test_a_served_request_moves_the_engine_series(gpt2: LoadedModel) -> None:
    """The service gives its engine the recorder: requests show up without a scrape hook."""
    async with serving(gpt2) as client:
        before = (await client.get("/metrics")).text
        done = await client.post("/v1/completions", json={"prompt": "the red", "max_tokens": 3})
        assert done.status_code == 200
        after = (await client.get("/metrics")).text

    def grown(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grown("mmgpt_e2e_request_latency_seconds_count") == 1
    assert grown("mmgpt_engine_step_seconds_count") >= 3
    assert grown("mmgpt_generation_tokens_total") == 3
    success = {"endpoint": "completions", "finished_reason": "length"}
    assert grown("mmgpt_request_success_total", **success) == 1
    assert metric(after, "mmgpt_num_requests_running") == 0
