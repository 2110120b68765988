"""A real `mmgpt serve` of a tiny Qwen2.5-VL and of a tiny Qwen3-VL, driven by the
openai package and by httpx: chat with images of two sizes (plain and streamed agree),
caption and QA uploads, and the refusals of this family's limits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.api.images import data_url, scene_png
from tests.conftest import ServerProcess, start_server
from tests.e2e.conftest import stream_post
from tests.qwen_vl_checkpoints import make_tiny_qwen_vl

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 6}
IMAGE_TOKEN_CAP = 40


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def qwen_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    folder = make_tiny_qwen_vl(tmp_path_factory.mktemp(request.param), family=request.param)
    process = start_server(
        Path(folder),
        tmp_path_factory.mktemp("qwen-logs"),
        max_image_tokens_per_request=IMAGE_TOKEN_CAP,
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def client(qwen_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{qwen_server.url}/v1", api_key="none", max_retries=0, timeout=120.0)


def image(width: int, height: int, detail: str = "auto") -> dict[str, Any]:
    url = {"url": data_url(scene_png(width, height)), "detail": detail}
    return {"type": "image_url", "image_url": url}


def messages(*images: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*images, {"type": "text", "text": "what is there"}]}]


def test_chat_with_two_images_plain_and_streamed_agree(client: OpenAI) -> None:
    model = client.models.list().data[0].id
    two = messages(image(16, 16), image(40, 24))
    plain = client.chat.completions.create(model=model, messages=two, **GREEDY)
    chunks = client.chat.completions.create(model=model, messages=two, stream=True, **GREEDY)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert plain.choices[0].message.content == streamed
    assert plain.usage is not None and plain.usage.prompt_tokens > 4 + 15


def test_caption_and_qa_uploads(qwen_server: ServerProcess) -> None:
    upload = {"image": ("scene.png", scene_png(32, 24), "image/png")}
    with httpx.Client(base_url=qwen_server.url, timeout=120.0) as http:
        caption = http.post("/v1/caption", files=upload, data={"max_tokens": "4"})
        assert caption.status_code == 200
        assert caption.json()["choices"][0]["finish_reason"] in ("stop", "length")
        fields = {"question": "what colour", "stream": "true", "max_tokens": "4"}
        events = stream_post(http, "/v1/qa", files=upload, data=fields)  # ends with [DONE]
        reasons = [choice["finish_reason"] for event in events for choice in event["choices"]]
        assert reasons[-1] in ("stop", "length")


def test_limits_are_400s_naming_their_numbers(client: OpenAI) -> None:
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match=f"at most {IMAGE_TOKEN_CAP}"):
        client.chat.completions.create(model=model, messages=messages(image(64, 48)), **GREEDY)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model, messages=messages(image(16, 16, "ultra")), **GREEDY
        )
    fits = client.chat.completions.create(model=model, messages=messages(image(16, 16)), **GREEDY)
    assert fits.choices[0].finish_reason in ("stop", "length")
