"""Engine test fixtures: tiny random checkpoints, loaded once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.engine import decode_mirror
from models import load_model
from models.base import LoadedModel
from tests.checkpoints import make_tiny_llama, make_tiny_llava
from tests.engine.drive import load
from tests.torch_threads import intra_op_threads

MODEL_FIXTURES = {"llama", "llama_bf16", "poisoned_llama", "llava"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that runs a model runs twice: decode attention gathering the K/V blocks,
    and reading the decode mirror (engaged at any size here; the tiny models are below
    the size where the engine would use it)."""
    if MODEL_FIXTURES & set(metafunc.fixturenames):
        metafunc.parametrize("decode_path", ["gather", "mirror"], indirect=True)


@pytest.fixture(autouse=True)
def decode_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    path = getattr(request, "param", "gather")
    if path == "mirror":
        monkeypatch.setattr(decode_mirror, "MIN_LAYER_BYTES", 0)
    return str(path)


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
def llama_bf16(llama_dir: Path) -> LoadedModel:
    return load_model(llama_dir, "cpu", torch.bfloat16)


@pytest.fixture
def poisoned_llama(llama_dir: Path) -> LoadedModel:
    """The tiny Llama with token 5's embedding NaN: a prompt holding it computes NaN
    keys and values, as an overflow in fp16 would."""
    loaded = load_model(llama_dir, "cpu", torch.float32)
    loaded.model.decoder.embed_tokens[5] = float("nan")  # type: ignore[attr-defined]
    return loaded


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def llava(llava_dir: Path) -> LoadedModel:
    return load(llava_dir)
