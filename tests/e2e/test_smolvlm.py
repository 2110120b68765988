"""A real `mmgpt serve` of a tiny SmolVLM, driven by the openai package and by httpx: chat
with a tiled image and with one read at detail "low" (plain and streamed agree), caption
and QA uploads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.api.images import scene_png
from tests.conftest import ServerProcess, start_server
from tests.e2e.conftest import stream_post
from tests.e2e.test_qwen_vl import image, messages
from tests.smolvlm_checkpoints import make_tiny_smolvlm

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def smolvlm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = make_tiny_smolvlm(tmp_path_factory.mktemp("smolvlm"))
    process = start_server(Path(folder), tmp_path_factory.mktemp("smolvlm-logs"))
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def client(smolvlm_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{smolvlm_server.url}/v1", api_key="none", max_retries=0, timeout=120.0)


def test_chat_with_tiled_and_low_detail_images(client: OpenAI) -> None:
    model = client.models.list().data[0].id
    two = messages(image(48, 32), image(40, 24, "low"))
    plain = client.chat.completions.create(model=model, messages=two, **GREEDY)
    chunks = client.chat.completions.create(model=model, messages=two, stream=True, **GREEDY)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert plain.choices[0].message.content == streamed
    assert plain.usage is not None and plain.usage.prompt_tokens > (7 + 1) * 4


def test_caption_and_qa_uploads(smolvlm_server: ServerProcess) -> None:
    upload = {"image": ("scene.png", scene_png(32, 24), "image/png")}
    with httpx.Client(base_url=smolvlm_server.url, timeout=120.0) as http:
        caption = http.post("/v1/caption", files=upload, data={"max_tokens": "4"})
        assert caption.status_code == 200
        assert caption.json()["choices"][0]["finish_reason"] in ("stop", "length")
        fields = {"question": "what colour", "stream": "true", "max_tokens": "4"}
        events = stream_post(http, "/v1/qa", files=upload, data=fields)  # ends with [DONE]
        reasons = [choice["finish_reason"] for event in events for choice in event["choices"]]
        assert reasons[-1] in ("stop", "length")
