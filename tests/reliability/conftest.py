"""Reliability fixtures: the shared real server's clients (from tests/e2e), a server that holds
little, and a loaded model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models import LoadedModel, load_model
from tests.conftest import SHARED_SERVER_SETTINGS, ServerProcess, start_server
from tests.e2e.conftest import http, model_id
from tests.torch_threads import intra_op_threads

__all__ = ["http", "model_id"]  # the e2e clients of the shared server, reused here


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir: Path) -> LoadedModel:
    return load_model(tiny_gpt2_dir)


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """Tiny tensors on shared cores stall in multi-threaded kernels: one thread in-process."""
    with intra_op_threads(1):
        yield


# A server that holds little: two running sequences and two waiting requests, an API key,
# and logs at info level (the security tests read its log for keys).
SMALL_SERVER_SETTINGS: dict[str, object] = {
    "max_num_seqs": 2,
    "max_waiting_requests": 2,
    "log_level": "info",
    **SHARED_SERVER_SETTINGS,
}
SMALL_SERVER_KEY = "sk-small-server-secret-0123456789"


@pytest.fixture(scope="package")
def small_server(
    tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    process = start_server(
        tiny_llava_dir,
        tmp_path_factory.mktemp("small-server"),
        api_key=SMALL_SERVER_KEY,
        **SMALL_SERVER_SETTINGS,
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()
