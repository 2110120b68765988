"""Fixtures of the benchmark-tool tests: tiny checkpoints, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import make_tiny_gpt2, make_tiny_llava


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava"))
