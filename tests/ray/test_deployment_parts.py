"""The parts of app/ray_serve.py that need no cluster: builder args, the per-replica metrics
endpoint, the replica header and /replica, the wait for the model, the health check."""

from __future__ import annotations

import inspect
import socket
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

ray_serve = pytest.importorskip("app.ray_serve", reason="needs the ray extra: pip install '.[ray]'")

from app.config import Settings  # noqa: E402
from app.engine.stats import EngineStats, StatsUpdate  # noqa: E402
from app.metrics import EngineStatsRecorder  # noqa: E402
from app.service import Service, Status  # noqa: E402
from tests.e2e.conftest import metric  # noqa: E402


def idle_service() -> Service:
    """A service that has not loaded anything (status LOADING, no engine)."""
    return Service(Settings(model="/nonexistent/checkpoint"))


def two_free_ports() -> int:
    """A port p such that p and p + 1 are both free on 127.0.0.1 (at this moment)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no two consecutive free ports")


def endpoint(first_port: int, count: int) -> Any:
    args = ray_serve.RayServeArgs(
        metrics_port=first_port, metrics_port_count=count, metrics_host="127.0.0.1"
    )
    return ray_serve.MetricsEndpoint(args)


def test_builder_args_are_typed_for_ray() -> None:
    """Ray validates `serve run`/serve.yaml args into the builder's pydantic annotation."""
    annotation = inspect.signature(ray_serve.build_app).parameters["args"].annotation
    assert annotation is ray_serve.RayServeArgs
    with pytest.raises(ValidationError):
        ray_serve.RayServeArgs.model_validate({"metrics_prot": 9500})


def test_build_app_refuses_an_unknown_setting_before_any_replica_starts() -> None:
    with pytest.raises(ValidationError, match="max_num_seq"):
        ray_serve.build_app(ray_serve.RayServeArgs(settings={"max_num_seq": 8}))
    app = ray_serve.build_app(ray_serve.RayServeArgs(settings={"max_num_seqs": 8}))
    assert type(app).__name__ == "Application"


def test_each_replica_takes_the_next_free_metrics_port() -> None:
    first = two_free_ports()
    endpoints = [endpoint(first, 2) for _ in range(3)]
    try:
        for each in endpoints:
            each.start()
        assert [each.port for each in endpoints] == [first, first + 1, None]
        text = httpx.get(f"http://127.0.0.1:{first + 1}/metrics").text
        assert "# HELP mmgpt_http_requests_total" in text
    finally:
        for each in endpoints:
            each.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{first}/metrics")


def test_a_replica_endpoint_serves_the_engine_gauges_its_engine_recorded() -> None:
    stats = EngineStats(
        num_running=3, num_waiting=5, kv_cache_usage=0.25, num_blocks=8, num_free_blocks=6,
        decode_mirror_bytes=0, prefix_cache_queries=0, prefix_cache_hits=0,
        image_cache_queries=0, image_cache_hits=0, num_preemptions=0, num_steps=1,
        last_step_end=0.0,
    )  # fmt: skip
    EngineStatsRecorder().record(StatsUpdate(stats))
    metrics = endpoint(0, 1)
    metrics.start()
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics.port}/metrics").text
    finally:
        metrics.stop()
    assert metric(text, "mmgpt_num_requests_running") == 3
    assert metric(text, "mmgpt_num_requests_waiting") == 5
    assert metric(text, "mmgpt_kv_cache_usage_ratio") == 0.25


def identified_app() -> Any:
    async def hello(_: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/hello", hello), Route("/replica", hello, methods=["POST"])])
    description = {"replica": "r1", "pid": 42, "metrics_url": "http://127.0.0.1:9500/metrics"}
    return ray_serve.ReplicaIdentity(app, describe=lambda: description)


@pytest.mark.anyio
async def test_every_response_names_its_replica_and_get_replica_describes_it() -> None:
    transport = httpx.ASGITransport(app=identified_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        hello = await client.get("/hello")
        missing = await client.get("/nowhere")
        described = await client.get("/replica")
        posted = await client.post("/replica")
    assert hello.text == "hello" and hello.headers[ray_serve.REPLICA_HEADER] == "r1"
    assert missing.status_code == 404 and missing.headers[ray_serve.REPLICA_HEADER] == "r1"
    assert described.json() == {
        "replica": "r1", "pid": 42, "metrics_url": "http://127.0.0.1:9500/metrics"
    }  # fmt: skip
    assert posted.text == "hello"  # only GET /replica is answered by the middleware


@pytest.mark.anyio
async def test_a_replica_whose_model_failed_or_is_slow_does_not_start() -> None:
    failed = idle_service()
    failed.status, failed.failure = Status.FAILED, "OSError: no weights"
    with pytest.raises(RuntimeError, match="no weights"):
        await ray_serve.wait_until_loaded(failed, timeout_s=5.0)
    with pytest.raises(RuntimeError, match="loading"):
        await ray_serve.wait_until_loaded(idle_service(), timeout_s=0.3)


def test_the_health_check_raises_until_the_engine_runs() -> None:
    check_health = ray_serve.MMGPTReplica.check_health
    with pytest.raises(RuntimeError, match="no app yet"):
        check_health(SimpleNamespace(service=None))
    service = idle_service()
    service.status = Status.READY  # but no engine loop
    with pytest.raises(RuntimeError, match="engine loop is not running"):
        check_health(SimpleNamespace(service=service))
