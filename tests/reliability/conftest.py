"""Reliability fixtures: the shared real server's clients (from tests/e2e) and a loaded model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models import LoadedModel, load_model
from tests.e2e.conftest import http, model_id

__all__ = ["http", "model_id"]  # the e2e clients of the shared server, reused here


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir: Path) -> LoadedModel:
    return load_model(tiny_gpt2_dir)


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """Tiny tensors on shared cores stall in multi-threaded kernels: one thread in-process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
