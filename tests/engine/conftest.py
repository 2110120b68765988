"""Engine test fixtures: tiny random checkpoints, loaded once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.base import LoadedModel
from tests.checkpoints import make_tiny_llama, make_tiny_llava
from tests.engine.drive import load
from tests.torch_threads import intra_op_threads


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Tiny tensors on shared cores stall in multi-threaded kernels; the tests use one thread."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def llama(llama_dir: Path) -> LoadedModel:
    return load(llama_dir)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def llava(llava_dir: Path) -> LoadedModel:
    return load(llava_dir)
