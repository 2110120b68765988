"""Fixtures shared by the service tests: tiny checkpoints and a real `mmgpt serve` process."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
