"""Throughput of mmgpt under Ray Serve with 1 and 2 replicas on one machine, beside plain
`mmgpt serve`: the same bench.serve load against each, one after the other.

    python deploy/ray/bench_replicas.py --model DIR --workload caption \\
        --num-prompts 128 --max-concurrency 32 --output-len 32 --ignore-eos --num-warmups 8

Layouts are REPLICAS x CPUS_PER_REPLICA (Ray sets each replica's OMP_NUM_THREADS to its
CPUs); `plain` is `mmgpt serve` without Ray, on all the cluster's CPUs. The local Ray
cluster and every server listen on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.serve import BenchReport, add_workload_args, load_config, run_benchmark, workload_spec

REPO = Path(__file__).resolve().parents[2]
READY_DEADLINE_S = 600.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--workload", default="caption")
    parser.add_argument("--layouts", default="plain,1x1,1x2,2x1", help="comma list")
    parser.add_argument("--cpus", type=int, default=2, help="the Ray cluster's CPUs")
    add_workload_args(parser)
    return parser.parse_args()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_replicas(url: str, count: int) -> None:
    """GET /replica until `count` distinct replicas answer (each answers once loaded)."""
    deadline, seen = time.monotonic() + READY_DEADLINE_S, set[str]()
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only {len(seen)} replicas after the deadline"
        try:
            seen.add(httpx.get(f"{url}/replica", timeout=30).json()["replica"])
        except (httpx.HTTPError, ValueError):
            time.sleep(0.5)  # the proxy has no route yet: poll again


@contextmanager
def plain_server(args: argparse.Namespace) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "serve", "--model", args.model]
    command += ["--port", str(port), "--num-threads", str(args.cpus), "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_DEADLINE_S
        while not _ready(url):
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)  # poll interval of /ready
        yield url
    finally:
        server.terminate()
        server.wait(60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def ray_cluster(cpus: int) -> Iterator[str]:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only; read at import
    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="mmgpt-ray-bench-", dir="/tmp")  # short socket paths
    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=temp_dir)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def deploy(url: str, model: str, replicas: int, cpus: int) -> None:
    from ray import serve

    from app.ray_serve import RayServeArgs, mmgpt_deployment

    args = RayServeArgs(settings={"model": model, "log_level": "warning"}, metrics_port=0)
    sized = mmgpt_deployment.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus})
    serve.run(sized.bind(args), name="mmgpt", route_prefix="/")
    wait_for_replicas(url, replicas)


def bench(args: argparse.Namespace, url: str, label: str) -> BenchReport:
    load = load_config(args, url, None)
    report = asyncio.run(run_benchmark(load, workload_spec(args, args.workload), label))
    print(f"{label}: {report.summary.output_throughput:.1f} tok/s", flush=True)
    return report


def run_layouts(args: argparse.Namespace) -> list[BenchReport]:
    layouts = args.layouts.split(",")
    reports = []
    if "plain" in layouts:
        with plain_server(args) as url:
            reports.append(bench(args, url, f"mmgpt serve, {args.cpus} threads"))
    ray_layouts = [layout for layout in layouts if layout != "plain"]
    if ray_layouts:
        with ray_cluster(args.cpus) as url:
            from ray import serve

            for layout in ray_layouts:
                replicas, cpus = (int(part) for part in layout.split("x"))
                deploy(url, args.model, replicas, cpus)
                label = f"Ray Serve, {replicas} replica(s) x {cpus} CPU"
                reports.append(bench(args, url, label))
                serve.delete("mmgpt")  # the next layout starts from no replicas
    return reports


def print_table(reports: list[BenchReport]) -> None:
    print("| layout | req/s | output tok/s | TTFT p50 ms | E2E p50 ms | errors |")
    print("|---|---|---|---|---|---|")
    for report in reports:
        s = report.summary
        print(
            f"| {report.label} | {s.request_throughput:.2f} | {s.output_throughput:.1f} "
            f"| {s.ttft.p50:.0f} | {s.e2e.p50:.0f} | {s.errors} |"
        )


def main() -> int:
    args = parse_args()
    args.model = str(Path(args.model).resolve())
    print("$ python deploy/ray/bench_replicas.py " + " ".join(sys.argv[1:]))
    print_table(run_layouts(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
