"""Two CPU replicas of mmgpt behind Ray Serve's HTTP proxy on loopback.

Both replicas serve concurrent captions and completions, each exports its own
Prometheus counts, and when one replica's process is killed every request still
succeeds (retried by the client where the proxy had routed it to the dead one)
while Ray starts a replacement that then serves too.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ray_serve = pytest.importorskip("app.ray_serve", reason="needs the ray extra: pip install '.[ray]'")

from tests.e2e.conftest import metric  # noqa: E402
from tests.ray.client import (  # noqa: E402
    ENDPOINTS,
    Served,
    SteadyLoad,
    concurrent_round,
    replicas_seen,
)
from tests.ray.conftest import needs_cluster  # noqa: E402

pytestmark = needs_cluster

NUM_REPLICAS = 2
PER_ENDPOINT = 4  # requests of each kind in one concurrent round
MAX_FIRST_ROUNDS = 5
DEADLINE_S = 300.0  # loading a replica's model on two busy cores


@pytest.fixture(scope="module")
def mmgpt_url(ray_proxy_url: str, ray_model_dir: Path) -> str:
    from ray import serve

    args = ray_serve.RayServeArgs(
        settings={"model": str(ray_model_dir), "log_level": "warning"},
        metrics_port=0,  # any free port: tests may run beside other servers
        load_timeout_s=DEADLINE_S,
    )
    deployment = ray_serve.mmgpt_deployment.options(
        num_replicas=NUM_REPLICAS, ray_actor_options={"num_cpus": 1}, max_constructor_retry_count=1
    )
    serve.run(deployment.bind(args), name="mmgpt", route_prefix="/")
    return ray_proxy_url


@pytest.fixture(scope="module")
def first_rounds(mmgpt_url: str) -> list[Served]:
    """Concurrent rounds until both replicas have served some (a few rounds at most)."""
    deadline = time.monotonic() + DEADLINE_S
    served: list[Served] = []
    for _ in range(MAX_FIRST_ROUNDS):
        served += concurrent_round(mmgpt_url, PER_ENDPOINT, deadline)
        if len({request.replica for request in served}) == NUM_REPLICAS:
            break
    return served


def test_both_replicas_serve_captions_and_completions(first_rounds: list[Served]) -> None:
    by_replica = Counter((request.replica, request.endpoint) for request in first_rounds)
    print(f"served by (replica, endpoint): {dict(by_replica)}")
    assert len({replica for replica, _ in by_replica}) == NUM_REPLICAS, by_replica
    assert {request.endpoint for request in first_rounds} == set(ENDPOINTS)
    retried = [request.failures for request in first_rounds if request.failures]
    assert not retried, f"requests failed while both replicas were healthy: {retried}"


def test_each_replica_exports_its_own_metrics(mmgpt_url: str, first_rounds: list[Served]) -> None:
    replicas = replicas_seen(mmgpt_url, NUM_REPLICAS)
    assert set(replicas) == {request.replica for request in first_rounds}
    for tag, info in replicas.items():
        text = httpx.get(info["metrics_url"], timeout=30.0).text
        for endpoint in ENDPOINTS:
            here = [r for r in first_rounds if r.replica == tag and r.endpoint == endpoint]
            counted = metric(text, "mmgpt_request_success_total", endpoint=endpoint)
            assert counted == len(here), (tag, endpoint, counted, len(here))


def test_requests_keep_succeeding_while_ray_replaces_a_killed_replica(mmgpt_url: str) -> None:
    before = replicas_seen(mmgpt_url, NUM_REPLICAS)
    victim, victim_info = sorted(before.items())[0]
    deadline = time.monotonic() + DEADLINE_S
    load = SteadyLoad(mmgpt_url, PER_ENDPOINT, deadline)
    with ThreadPoolExecutor(max_workers=len(load.endpoints)) as pool:
        clients = load.run(pool)
        try:
            # Kill while requests run on both replicas: some are in flight on the victim.
            assert load.wait_for(lambda served: len(served) >= len(load.endpoints))
            killed_at = time.monotonic()
            os.kill(victim_info["pid"], signal.SIGKILL)
            replaced = load.wait_for(lambda served: bool(replicas(served) - set(before)))
        finally:
            load.stopped.set()
        for client in clients:
            client.result()  # every request was served, within its retries
    assert replaced, f"no new replica within {DEADLINE_S} s; served by {replicas(load.served)}"
    after_kill = [request for request in load.served if request.started > killed_at]
    failures = Counter(failure for request in load.served for failure in request.failures)
    first_new = min(r.started for r in load.served if r.replica not in before) - killed_at
    print(
        f"{len(after_kill)} requests sent after the kill, all served; {sum(failures.values())} "
        f"attempts retried {dict(failures)}; the replacement served a request sent "
        f"{first_new:.1f} s after the kill"
    )
    assert victim not in replicas(after_kill)
    wait_until_healthy(deadline)


def replicas(served: list[Served]) -> set[str]:
    return {request.replica for request in served}


def wait_until_healthy(deadline: float) -> None:
    """Serve reports the deployment HEALTHY again, with all its replicas running."""
    from ray import serve

    while time.monotonic() < deadline:
        deployment = serve.status().applications["mmgpt"].deployments["mmgpt"]
        if deployment.status == "HEALTHY" and deployment.replica_states == {
            "RUNNING": NUM_REPLICAS
        }:
            return
        time.sleep(0.5)  # poll interval of Serve's status, not a wait for a condition
    raise AssertionError(f"deployment not healthy again: {serve.status()}")
