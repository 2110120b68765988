"""Fault injection for in-process engines: a runner whose steps fail or hang, logits gone bad.

Tests wrap the real runner or model of one engine (no production code path knows
about these): a step holding a request with POISON_MAX_TOKENS raises, a held
runner blocks its next step until released, and the logits can be made NaN or +inf.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import torch
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app
from models import LoadedModel

POISON_MAX_TOKENS = 7  # a request asking for exactly this many tokens poisons its step
READY_POLL_S = 0.02
HOLD_LIMIT_S = 60.0


class FaultyRunner:
    """Wraps a ModelRunner: poisoned steps raise; while held, a step blocks until released."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.failed_batches: list[set[str]] = []  # request ids of each step that raised
        self.entered_hold = threading.Event()
        self._released = threading.Event()
        self._released.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def hold(self) -> None:
        self.entered_hold.clear()
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def run(self, batch: Any) -> Any:
        if not self._released.is_set():
            self.entered_hold.set()
            assert self._released.wait(HOLD_LIMIT_S), "a held step was never released"
        if any(seq.params.max_tokens == POISON_MAX_TOKENS for seq in batch.seqs):
            self.failed_batches.append({seq.request_id for seq in batch.seqs})
            raise RuntimeError("injected step fault")
        return self.runner.run(batch)

    @property
    def failed_request_ids(self) -> set[str]:
        return set().union(*self.failed_batches)


class BadLogitsModel:
    """Wraps a model: while `mode` is "nan" or "inf", every logit is that value; while it is
    "peak", every logit is -inf but the original best one (a model that rules tokens out)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.mode: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def compute_logits(self, hidden: torch.Tensor, row_major: bool = False) -> torch.Tensor:
        logits = self.model.compute_logits(hidden, row_major)  # [N, vocab]
        if self.mode == "peak":
            best = logits.argmax(dim=-1, keepdim=True)  # [N, 1]
            return torch.full_like(logits, float("-inf")).scatter_(1, best, 0.0)
        if self.mode is not None:
            logits.fill_(float(self.mode))
        return logits


@asynccontextmanager
async def in_process(
    loaded: LoadedModel, **settings: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running (engine loop started) and a client, once ready."""
    app = create_app(Settings(model=loaded.path, num_threads=1, **settings), loaded)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client,
    ):
        await wait_status(client, "/ready", 200)
        yield app, client


async def wait_status(client: httpx.AsyncClient, path: str, status: int) -> httpx.Response:
    """Polls GET `path` until it answers `status` (bounded by HOLD_LIMIT_S)."""
    with anyio.fail_after(HOLD_LIMIT_S):
        while (response := await client.get(path)).status_code != status:
            await anyio.sleep(READY_POLL_S)
    return response
