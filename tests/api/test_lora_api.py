"""LoRA adapters over HTTP: /v1/models, `model` picking an adapter, 404s, runtime loading
with its path checks, unloading while a request runs, and the per-adapter gauges."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from models import LoadedModel, load_model
from tests.api.images import scene_png
from tests.api.test_text_model import serving
from tests.e2e.conftest import assert_error
from tests.lora_adapters import LLAVA_DECODER, PROJECTOR, make_adapter

pytestmark = pytest.mark.anyio
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def adapter_root(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    targets = LLAVA_DECODER.format("q_proj|v_proj|down_proj") + "|" + PROJECTOR
    make_adapter(tiny_llava_dir, root / "tuned", rank=4, targets=targets, seed=7, multimodal=True)
    return root


@pytest.fixture
def llava(tiny_llava_dir: Path) -> LoadedModel:
    return load_model(tiny_llava_dir)  # fresh: adapter slots wrap the model's products


async def complete(client: httpx.AsyncClient, model: str | None, **body: object) -> httpx.Response:
    return await client.post(
        "/v1/completions", json={"prompt": "the red circle", **GREEDY, **body, "model": model}
    )


async def test_models_list_and_model_picks_the_adapter(
    llava: LoadedModel, adapter_root: Path
) -> None:
    tuned = f"tuned={adapter_root / 'tuned'}"
    async with serving(llava, lora_modules=[tuned]) as client:
        listed = (await client.get("/v1/models")).json()["data"]
        base = listed[0]["id"]
        assert [(m["id"], m["parent"]) for m in listed] == [(base, None), ("tuned", base)]
        assert (await client.get("/v1/models/tuned")).json()["parent"] == base
        assert_error(await client.get("/v1/models/nope"), 404)
        from_base, from_tuned = await complete(client, base), await complete(client, "tuned")
        assert from_tuned.json()["model"] == "tuned"
        assert from_base.json()["choices"][0]["text"] != from_tuned.json()["choices"][0]["text"]
        upload = {"image": ("scene.png", scene_png(), "image/png")}
        for route, form in (("/v1/caption", {}), ("/v1/qa", {"question": "what?"})):
            fields = {**form, "model": "tuned", "max_tokens": "3"}
            answered = await client.post(route, data=fields, files=upload)
            assert answered.status_code == 200 and answered.json()["model"] == "tuned"
            missing = await client.post(route, data={**fields, "model": "nope"}, files=upload)
            assert assert_error(missing, 404, param="model")["code"] == "model_not_found"
        chat = {"messages": [{"role": "user", "content": "hi"}], "model": "nope"}
        refused = await client.post("/v1/chat/completions", json=chat)
        assert assert_error(refused, 404, param="model")["code"] == "model_not_found"
        assert assert_error(await complete(client, "nope"), 404)["code"] == "model_not_found"
        metrics = (await client.get("/metrics")).text
        assert 'mmgpt_lora_requests_running{adapter="tuned"} 0.0' in metrics


async def test_runtime_loading_is_off_by_default(llava: LoadedModel, adapter_root: Path) -> None:
    async with serving(llava) as client:
        body = {"lora_name": "x", "lora_path": str(adapter_root / "tuned")}
        off = await client.post("/v1/load_lora_adapter", json=body)
        assert assert_error(off, 403)["code"] == "runtime_lora_disabled"


async def test_load_and_unload_inside_the_allowed_folders(
    llava: LoadedModel, adapter_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text(json.dumps({"r": 4}))
    os.symlink(outside, adapter_root / "link-out")
    settings = {"allow_runtime_lora": True, "lora_dirs": [str(adapter_root)]}
    async with serving(llava, **settings) as client:

        async def load(name: str, path: str) -> httpx.Response:
            body = {"lora_name": name, "lora_path": path}
            return await client.post("/v1/load_lora_adapter", json=body)

        odd = ("nul\x00byte", "x" * 5000)
        for path in ("../outside", str(outside), "link-out", "tuned/../../outside", "/etc", *odd):
            refused = assert_error(await load("bad", path), 400, param="lora_path")
            assert str(outside) not in refused["message"]
        assert_error(await load("bad", "link-out/.."), 400, param="lora_path")  # the link first
        broken = await load("bad", "tuned/..")  # the root itself: inside, but no adapter there
        assert "not a PEFT adapter folder" in assert_error(broken, 400)["message"]
        assert (await load("tuned", "tuned")).status_code == 200
        assert_error(await load("tuned", str(adapter_root / "tuned")), 400)  # the name is taken
        listed = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        assert listed[1:] == ["tuned"]
        assert (await complete(client, "tuned")).status_code == 200
        unload = await client.post("/v1/unload_lora_adapter", json={"lora_name": "tuned"})
        assert unload.status_code == 200
        assert_error(await complete(client, "tuned"), 404)
        again = await client.post("/v1/unload_lora_adapter", json={"lora_name": "tuned"})
        assert assert_error(again, 404, param="lora_name")["code"] == "model_not_found"


async def test_unloading_lets_a_queued_request_finish(
    llava: LoadedModel, adapter_root: Path
) -> None:
    """One running slot, held by a long base request: the adapter's request waits behind it
    while the adapter is unloaded, then runs with it."""
    settings = {"allow_runtime_lora": True, "lora_dirs": [str(adapter_root)], "max_num_seqs": 1}
    async with serving(llava, lora_modules=[f"tuned={adapter_root / 'tuned'}"], **settings) as c:
        expected = (await complete(c, "tuned")).json()["choices"][0]["text"]
        hog = asyncio.create_task(complete(c, None, max_tokens=900))
        await until_metric(c, "mmgpt_num_requests_running 1.0")
        queued = asyncio.create_task(complete(c, "tuned"))
        await until_metric(c, 'mmgpt_lora_requests_waiting{adapter="tuned"} 1.0')
        unload = await c.post("/v1/unload_lora_adapter", json={"lora_name": "tuned"})
        assert unload.status_code == 200 and not queued.done()
        assert_error(await complete(c, "tuned"), 404)
        assert (await queued).json()["choices"][0]["text"] == expected
        assert (await hog).status_code == 200
        assert "mmgpt_lora_requests_waiting{" not in (await c.get("/metrics")).text


async def until_metric(client: httpx.AsyncClient, line: str) -> None:
    deadline = time.monotonic() + 60
    while line not in (await client.get("/metrics")).text:
        assert time.monotonic() < deadline, f"no {line!r} in /metrics"
        await asyncio.sleep(0.01)  # poll interval
