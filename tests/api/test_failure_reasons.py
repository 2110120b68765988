"""Refusals are counted by why: a full queue, a server not serving, an unknown model."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app import metrics
from app.config import Settings
from app.main import create_app
from models import LoadedModel
from tests.api.test_text_model import gpt2, serving
from tests.e2e.conftest import assert_error

pytestmark = pytest.mark.anyio
__all__ = ["gpt2"]  # the module's loaded text model, reused


def failures(reason: str) -> float:
    return float(metrics.REQUEST_FAILURE.labels("completions", reason)._value.get())


def test_every_reason_is_declared() -> None:
    assert {"not_found", "not_ready", "overloaded", "validation"} <= set(metrics.FAILURE_REASONS)


async def test_loading_and_draining_are_not_ready_not_overloaded(tmp_path: Path) -> None:
    app = create_app(Settings(model=str(tmp_path)))  # no lifespan: it stays loading
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        before = failures("not_ready"), failures("overloaded")
        loading = await client.post("/v1/completions", json={"prompt": "x"})
        assert assert_error(loading, 503)["code"] == "not_ready"
        app.state.service.begin_drain()
        draining = await client.post("/v1/completions", json={"prompt": "x"})
        assert assert_error(draining, 503)["code"] == "shutting_down"
        assert (failures("not_ready"), failures("overloaded")) == (before[0] + 2, before[1])


async def test_a_full_queue_is_overloaded_and_an_unknown_model_not_found(
    gpt2: LoadedModel,
) -> None:
    async with serving(gpt2, max_waiting_requests=0) as client:
        before = failures("overloaded"), failures("not_found"), failures("validation")
        full = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert assert_error(full, 503)["code"] == "overloaded"
        unknown = await client.post("/v1/completions", json={"prompt": "x", "model": "other"})
        assert_error(unknown, 404)
        after = failures("overloaded"), failures("not_found"), failures("validation")
        assert after == (before[0] + 1, before[1] + 1, before[2])
