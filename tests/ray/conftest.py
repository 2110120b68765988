"""A local Ray cluster on loopback with mmgpt deployed on it, and everything it started stopped.

The cluster tests start real processes (Ray's GCS, raylet, Serve's controller and
proxy, one process per replica) and take minutes on two cores, so they run only
under `make test-ray` (MMGPT_TEST_RAY=1); the rest of tests/ray runs wherever the
`ray` extra is installed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from app.config import default_model_path
from tests.conftest import free_port

if TYPE_CHECKING:
    import psutil  # the ray extra brings it; `make test` may run without

NUM_CPUS = 2  # the Ray cluster's CPUs: one per replica
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # mmgpt passes nothing through Ray's object store
EXIT_DEADLINE_S = 60.0

if os.environ.get("MMGPT_TEST_RAY") == "1":
    # Read once when Ray is imported: Ray then takes 127.0.0.1 as the node's address and
    # binds its own servers (GCS, raylet, agents) to loopback. It is the switch Ray keeps
    # for single-machine clusters on Windows and macOS; on Linux it works the same.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

needs_cluster = pytest.mark.skipif(
    os.environ.get("MMGPT_TEST_RAY") != "1",
    reason="starts a local Ray cluster (minutes): run `make test-ray`",
)


@pytest.fixture(scope="session")
def ray_model_dir(tiny_llava_dir: Path) -> Path:
    """The shipped default model when it is there, else the tests' tiny LLaVA."""
    default = default_model_path()
    return default if (default / "config.json").is_file() else tiny_llava_dir


@pytest.fixture(scope="module")
def ray_proxy_url() -> Iterator[str]:
    """Starts Ray (2 CPUs, loopback) and Serve's HTTP proxy on a free loopback port."""
    import psutil
    import ray
    from ray import serve

    # Short on purpose: Ray's Unix socket paths under it must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="mmgpt-ray-", dir="/tmp")
    ours = psutil.Process()
    before = {child.pid for child in ours.children(recursive=True)}
    ray.init(
        address="local",
        num_cpus=NUM_CPUS,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        _temp_dir=temp_dir,
    )
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        started = [child for child in ours.children(recursive=True) if child.pid not in before]
        serve.shutdown()
        ray.shutdown()
        try:
            assert_all_exited(started)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)


def assert_all_exited(processes: list[psutil.Process]) -> None:
    """Fails if a process the cluster started outlives its shutdown (and then ends it)."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=EXIT_DEADLINE_S)
    names = [f"{process.pid} {process.name()}" for process in alive]
    for process in alive:
        process.kill()
    assert not alive, f"still running after ray.shutdown(): {names}"
