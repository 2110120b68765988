"""The app in-process with a real engine on a text-only model: image refusals and overload."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from models import LoadedModel, load_model
from tests.api.images import data_url, scene_png
from tests.e2e.conftest import assert_error

pytestmark = pytest.mark.anyio
READY_DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir: Path) -> LoadedModel:
    return load_model(tiny_gpt2_dir)


@asynccontextmanager
async def serving(loaded: LoadedModel, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running (the engine loop started), ready to answer."""
    app = create_app(Settings(model=loaded.path, num_threads=1, **settings), loaded)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client,
    ):
        deadline = time.monotonic() + READY_DEADLINE_S
        while (await client.get("/ready")).status_code != 200:
            assert time.monotonic() < deadline, "the engine did not start"
            await asyncio.sleep(0.02)  # poll interval
        yield client


async def test_text_model_completes_and_refuses_images(gpt2: LoadedModel) -> None:
    async with serving(gpt2) as client:
        done = await client.post("/v1/completions", json={"prompt": "the red", "max_tokens": 3})
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
        upload = {"image": ("scene.png", scene_png(), "image/png")}
        caption = await client.post("/v1/caption", files=upload)
        assert "does not accept images" in assert_error(caption, 400)["message"]
        image_part = {"type": "image_url", "image_url": {"url": data_url(scene_png())}}
        chat = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": [image_part]}], "max_tokens": 2},
        )
        assert_error(chat, 400)
        text_chat = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2},
        )
        assert text_chat.status_code == 200, text_chat.text


async def test_full_waiting_queue_is_503_with_retry_after(gpt2: LoadedModel) -> None:
    """One running and one waiting slot: of a burst of long requests the rest are refused."""
    async with serving(gpt2, max_num_seqs=1, max_waiting_requests=1) as client:
        body = {"prompt": "the", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
        burst = [client.post("/v1/completions", json=body) for _ in range(8)]
        responses = await asyncio.gather(*burst)
        refused = [r for r in responses if r.status_code == 503]
        accepted = [r for r in responses if r.status_code == 200]
        assert refused and accepted and len(refused) + len(accepted) == len(responses)
        for response in refused:
            assert assert_error(response, 503)["code"] == "overloaded"
            assert int(response.headers["retry-after"]) >= 1
        for response in accepted:
            assert response.json()["usage"]["completion_tokens"] == 100
        text = (await client.get("/metrics")).text
        assert 'mmgpt_request_failure_total{endpoint="completions",reason="overloaded"}' in text
