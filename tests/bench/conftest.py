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


@pytest.fixture(scope="session")
def bench_qwen_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.qwen_vl_checkpoint import make_qwen_vl

    return make_qwen_vl(tmp_path_factory.mktemp("qwen-vl"), size="tiny")


@pytest.fixture(scope="session")
def bench_smolvlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.smolvlm_checkpoint import make_smolvlm

    return make_smolvlm(tmp_path_factory.mktemp("smolvlm"), size="tiny")
