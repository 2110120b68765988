"""The adversarial image corpus against the real server, uploaded and as data URLs.

Each specimen gets one of its allowed answers (a served caption or a clear 4xx
envelope naming the image), never a 5xx or a hang; the server's peak resident
memory over the whole corpus stays bounded; decodable oddities decode right
(an animated GIF is its first frame, EXIF orientation is applied, transparency
lies over white).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image, ImageOps

from tests.api.images import data_url, encode
from tests.conftest import ServerProcess
from tests.e2e.conftest import assert_error, wait_idle
from tests.reliability import corpus
from tests.reliability.procstat import peak_rss_bytes, reset_peak_rss, rss_bytes

CORPUS = corpus.build()
PEAK_GROWTH_LIMIT = 300 * 2**20  # decoding is capped at 1 MP here: far below this
GREEDY: dict[str, Any] = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module", autouse=True)
def bounded_memory(server: ServerProcess, http: httpx.Client) -> Iterator[None]:
    """The peak RSS over the whole corpus, against the RSS before it; then still serving."""
    pid = server.process.pid
    wait_idle(http)
    reset_peak_rss(pid)
    baseline = rss_bytes(pid)
    yield
    growth = peak_rss_bytes(pid) - baseline
    assert growth < PEAK_GROWTH_LIMIT, f"peak RSS grew {growth / 2**20:.0f} MiB over the corpus"
    wait_idle(http)
    assert http.post("/v1/completions", json={"prompt": "ok?", "max_tokens": 2}).status_code == 200


def caption(http: httpx.Client, data: bytes, content_type: str = "image/png") -> httpx.Response:
    files = {"image": ("upload", data, content_type)}
    return http.post("/v1/caption", files=files, data=GREEDY)


def chat(http: httpx.Client, data: bytes) -> httpx.Response:
    part = {"type": "image_url", "image_url": {"url": data_url(data)}}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "what?"}]}]
    return http.post("/v1/chat/completions", json={"messages": messages, **GREEDY})


def _check(response: httpx.Response, specimen: corpus.Specimen, param_prefix: str) -> None:
    assert response.status_code in specimen.allowed, (specimen.name, response.text)
    if response.status_code >= 400:
        error = assert_error(response, response.status_code)
        assert error["param"] and error["param"].startswith(param_prefix), error
    else:
        assert response.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("specimen", CORPUS, ids=[s.name for s in CORPUS])
def test_uploads(http: httpx.Client, specimen: corpus.Specimen) -> None:
    _check(caption(http, specimen.data, specimen.content_type), specimen, "image")


@pytest.mark.parametrize("specimen", CORPUS, ids=[s.name for s in CORPUS])
def test_data_urls(http: httpx.Client, specimen: corpus.Specimen) -> None:
    _check(chat(http, specimen.data), specimen, "messages")


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_an_animated_gif_is_its_first_frame(http: httpx.Client) -> None:
    gif = corpus.animated_gif()
    first = corpus.first_gif_frame_png(gif)
    assert _text(caption(http, gif, "image/gif")) == _text(caption(http, first))


def test_exif_orientation_is_applied(http: httpx.Client) -> None:
    jpeg = corpus.exif_rotated_jpeg()
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg)))
    assert upright.size == (24, 48)  # stored 48x24, displayed rotated
    same_pixels = encode(upright.convert("RGB"))
    assert _text(caption(http, jpeg, "image/jpeg")) == _text(caption(http, same_pixels))


def test_transparency_lies_over_white(http: httpx.Client) -> None:
    transparent, white = corpus.transparent_rgba_png(), corpus.white_png()
    assert _text(caption(http, transparent)) == _text(caption(http, white))
