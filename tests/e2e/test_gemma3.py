"""A real `mmgpt serve` of a tiny Gemma 3 with images, driven by the openai package: a chat
with an image answers what transformers' generate() does on the processor's inputs, plain
and streamed alike; caption and question uploads answer."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from tests.api.images import data_url, scene_png
from tests.conftest import ServerProcess, start_server
from tests.engine.drive import load
from tests.engine.gemma3_reference import Gemma3Reference
from tests.gemma3_checkpoints import make_tiny_gemma3_vl

MAX_TOKENS = 6
QUESTION = "what is on the left"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gemma3_vl(tmp_path_factory.mktemp("gemma3-vl"))


@pytest.fixture(scope="module")
def server(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(folder, tmp_path_factory.mktemp("gemma3-logs"))
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def test_chat_with_an_image_answers_as_generate(folder: Path, server: ServerProcess) -> None:
    png = scene_png(40, 24)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120.0)
    content = [
        {"type": "image_url", "image_url": {"url": data_url(png)}},
        {"type": "text", "text": QUESTION},
    ]
    chat = {"messages": [{"role": "user", "content": content}], "temperature": 0}
    model = client.models.list().data[0].id
    plain = client.chat.completions.create(model=model, max_tokens=MAX_TOKENS, **chat)
    chunks = client.chat.completions.create(model=model, max_tokens=MAX_TOKENS, stream=True, **chat)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    reference = Gemma3Reference(load(folder))
    request = reference.request(QUESTION, [Image.open(io.BytesIO(png)).convert("RGB")])
    expected = reference.generate(request, MAX_TOKENS)
    text = reference.loaded.tokenizer.decode(expected, skip_special_tokens=True)
    assert plain.choices[0].message.content == streamed == text
    assert plain.usage is not None and plain.usage.prompt_tokens == len(request.prompt)


def test_caption_and_question_uploads(server: ServerProcess) -> None:
    upload = {"image": ("scene.png", scene_png(32, 24), "image/png")}
    asks = {"/v1/caption": {"prompt": "describe it"}, "/v1/qa": {"question": "which colour"}}
    with httpx.Client(base_url=server.url, timeout=120.0) as http:
        for path, fields in asks.items():
            answer = http.post(path, files=upload, data={**fields, "max_tokens": "4"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["finish_reason"] in ("stop", "length")
