"""Every refusal of the real server: status code and OpenAI envelope; then it still serves."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from tests.api.images import data_url, encode, png_declaring, scene_png
from tests.conftest import SHARED_SERVER_SETTINGS, ServerProcess
from tests.e2e.conftest import assert_error, metric, wait_idle

MAX_IMAGE_BYTES = int(str(SHARED_SERVER_SETTINGS["max_image_bytes"]))
MAX_BODY_BYTES = int(str(SHARED_SERVER_SETTINGS["max_body_bytes"]))


@pytest.fixture(scope="module", autouse=True)
def still_serving_afterwards(http: httpx.Client) -> Iterator[None]:
    """After every refusal below: nothing left running, and a request still succeeds."""
    yield
    wait_idle(http)
    response = http.post("/v1/completions", json={"prompt": "still there?", "max_tokens": 3})
    assert response.status_code == 200, response.text


def _noise_png(side: int) -> bytes:
    """Incompressible pixels: a PNG of about 3 * side**2 bytes."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels))


def _upload(data: bytes, name: str = "scene.png", **fields: Any) -> dict[str, Any]:
    return {"files": {"image": (name, data, "image/png")}, "data": fields}


def _chat_with_image(url: str) -> dict[str, Any]:
    image = {"type": "image_url", "image_url": {"url": url}}
    return {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logprobs": 999}, "logprobs"),
        ({"prompt": "x", "seed": 2**70}, "seed"),
        ({"prompt": "x", "logit_bias": {"token": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"999999999": 1}}, "logit_bias"),  # past the vocabulary
        ({"prompt": "x", "response_format": {"type": "yaml"}}, "response_format"),
        (
            {
                "prompt": "x",
                "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}},
            },
            "response_format",
        ),
        ({"prompt": 42}, None),
        ({}, "prompt"),
    ],
)
def test_invalid_completion_fields_are_400(
    http: httpx.Client, body: dict[str, Any], param: str | None
) -> None:
    error = assert_error(http.post("/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error


def test_malformed_bodies_are_400(http: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    assert_error(http.post("/v1/completions", content=b"{not json", headers=headers), 400)
    assert_error(
        http.post("/v1/chat/completions", json={"messages": "hello"}), 400, param="messages"
    )
    assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "robot"}]}), 400)
    assert_error(http.post("/v1/caption", data={"prompt": "no image"}), 400, param="image")
    assert_error(http.post("/v1/qa", **_upload(scene_png())), 400, param="question")


def test_prompt_longer_than_the_context_says_both_numbers(http: httpx.Client) -> None:
    context = http.get("/v1/models").json()["data"][0]["max_model_len"]
    response = http.post("/v1/completions", json={"prompt": "red " * context, "max_tokens": 10})
    error = assert_error(response, 400)
    assert error["code"] == "context_length_exceeded"
    assert str(context) in error["message"] and "10" in error["message"]


def test_unknown_model_is_404(http: httpx.Client, openai_client: OpenAI) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = {
            "model": "no-such-model",
            "prompt": "x",
            "messages": [{"role": "user", "content": "x"}],
        }
        error = assert_error(http.post(path, json=body), 404, param="model")
        assert error["code"] == "model_not_found"
    assert_error(http.post("/v1/engines/no-such-model/completions", json={"prompt": "x"}), 404)
    assert_error(http.post("/v1/caption", **_upload(scene_png(), model="no-such-model")), 404)
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="no-such-model", prompt="x")


def test_auth_is_required_on_v1_only(server: ServerProcess, model_id: str) -> None:
    anonymous = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"})
    assert_error(anonymous, 401)
    wrong = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401)
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert server.api_key is not None and server.api_key not in server.log_tail(10_000)


def test_oversized_body_is_413_before_reading(http: httpx.Client) -> None:
    response = http.post("/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1))
    assert assert_error(response, 413)["code"] == "too_large"


def test_oversized_images_are_413(http: httpx.Client) -> None:
    big = _noise_png(340)  # ~350 kB, over the image cap and under the body cap
    assert MAX_IMAGE_BYTES < len(big) < MAX_BODY_BYTES
    assert_error(http.post("/v1/caption", **_upload(big)), 413, param="image")
    chat = http.post("/v1/chat/completions", json=_chat_with_image(data_url(big)))
    assert_error(chat, 413)
    bomb = png_declaring(20_000, 20_000)  # 400 MP declared in under 100 bytes
    assert_error(http.post("/v1/qa", **_upload(bomb, question="what?")), 413, param="image")


def test_unsupported_and_broken_images(http: httpx.Client) -> None:
    svg = b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'/>"
    assert_error(http.post("/v1/caption", **_upload(svg, name="x.svg")), 415, param="image")
    text_as_png = http.post("/v1/chat/completions", json=_chat_with_image(data_url(b"hello")))
    assert_error(text_as_png, 415)
    not_an_image = http.post(
        "/v1/chat/completions", json=_chat_with_image("data:text/html;base64,PGI+PC9iPg==")
    )
    assert_error(not_an_image, 415)
    truncated = scene_png(64, 64)[:100]
    assert_error(http.post("/v1/caption", **_upload(truncated)), 400, param="image")
    assert_error(http.post("/v1/caption", **_upload(b"")), 400, param="image")


def test_image_url_rules(http: httpx.Client) -> None:
    remote = http.post("/v1/chat/completions", json=_chat_with_image("http://127.0.0.1/a.png"))
    assert "not enabled" in assert_error(remote, 400)["message"]
    local_file = http.post("/v1/chat/completions", json=_chat_with_image("file:///etc/passwd"))
    assert_error(local_file, 400)
    nine = [{"type": "image_url", "image_url": {"url": data_url(scene_png())}}] * 9
    too_many = http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": nine}]}
    )
    assert_error(too_many, 400)


def test_image_token_in_text_is_refused(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"prompt": "look <image> here"})
    assert_error(response, 400, param="prompt")
    with io.BytesIO(scene_png()) as image:
        sneaky = http.post(
            "/v1/qa", files={"image": ("a.png", image, "image/png")}, data={"question": "<image>"}
        )
    assert_error(sneaky, 400, param="question")
    chat = _chat_with_image(data_url(scene_png()))
    chat["messages"][0]["content"][1]["text"] = "and <image>"
    assert_error(http.post("/v1/chat/completions", json=chat), 400, param="messages")


def test_a_batch_with_one_prompt_too_long_is_refused_whole(http: httpx.Client) -> None:
    """No prompt of the batch reaches the engine: after one more request (which the engine
    takes after anything sent before it), it has finished exactly one request more."""
    finished = "mmgpt_request_prompt_tokens_count"
    before = metric(wait_idle(http), finished)
    context = http.get("/v1/models").json()["data"][0]["max_model_len"]
    body = {"prompt": ["a red circle", "red " * context], "max_tokens": 4}
    error = assert_error(http.post("/v1/completions", json=body), 400, param="max_tokens")
    assert error["code"] == "context_length_exceeded"
    after = http.post("/v1/completions", json={"prompt": "a red circle", "max_tokens": 2})
    assert after.status_code == 200, after.text
    assert metric(wait_idle(http), finished) == before + 1


def test_refusals_are_counted_by_reason(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    for reason in ("validation", "too_large", "unsupported_media"):
        assert metric(text, "mmgpt_request_failure_total", reason=reason) >= 1, reason
