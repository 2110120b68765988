"""The README's two commands: `mmgpt finetune` on the shipped model, then `mmgpt serve
--lora-modules`, asked with the openai client (chat with an image) and over multipart
(caption, QA) for the adapter and for the base model from the same server."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from app.cli import main
from app.config import default_model_path
from tests.api.images import data_url, scene_png
from tests.conftest import ServerProcess, start_server
from tests.torch_threads import intra_op_threads

ADAPTER = "scenes-tuned"


def _training_line(answer: str) -> str:
    image = {"type": "image_url", "image_url": {"url": data_url(scene_png())}}
    user = [{"type": "text", "text": "What is on the left?"}, image]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages})


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("finetune")
    data = folder / "train.jsonl"
    data.write_text("\n".join(_training_line(a) for a in ("a red circle", "a blue square")) + "\n")
    out = folder / "adapter"
    argv = [
        "finetune", "--model", str(default_model_path()), "--data", str(data), "--out", str(out),
        "--max-steps", "2", "--batch-size", "2", "--rank", "4", "--learning-rate", "0.05",
        "--threads", "1", "--train-projector", "--no-progress",
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), intra_op_threads(1):
        assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def server(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("logs")
    process = start_server(default_model_path(), logs, lora_modules=f"{ADAPTER}={adapter}")
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def test_the_adapter_is_served_beside_the_base(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    models = {model.id: model for model in client.models.list().data}
    assert set(models) == {"mmgpt-scenes", ADAPTER}
    assert models[ADAPTER].model_extra and models[ADAPTER].model_extra["parent"] == "mmgpt-scenes"
    image = {"type": "image_url", "image_url": {"url": data_url(scene_png())}}
    content = [{"type": "text", "text": "What is on the left?"}, image]
    for model in models:
        chat = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
            max_tokens=8,
            temperature=0,
        )
        assert chat.model == model and chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    upload = {"image": ("scene.png", scene_png(), "image/png")}
    for route, fields in (("caption", {}), ("qa", {"question": "What is on the left?"})):
        for model in models:
            form = {**fields, "model": model, "max_tokens": "8", "temperature": "0"}
            answered = httpx.post(f"{server.url}/v1/{route}", data=form, files=upload, timeout=60)
            assert answered.status_code == 200, answered.text
            assert answered.json()["model"] == model
