"""The app in-process on a tiny Qwen2.5-VL: chat with several images of any size, caption
and QA through the family's chat template, `detail`, the image-token cap (checked from the
header, before decoding), the metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from app import media, metrics
from app.engine.stats import StatsUpdate, StepStats
from models import LoadedModel, load_model
from tests.api.images import data_url, scene_png
from tests.api.test_metrics import IDLE, sample
from tests.api.test_text_model import serving
from tests.e2e.conftest import assert_error
from tests.qwen_vl_checkpoints import TOKEN_PIXELS, make_tiny_qwen_vl

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = make_tiny_qwen_vl(tmp_path_factory.mktemp("qwen2_5_vl"), family="qwen2_5_vl")
    return load_model(Path(folder))


def image_part(
    width: int, height: int, detail: str | None = None, truncated: bool = False
) -> dict[str, Any]:
    """A chat image part; `truncated`: a valid header, pixel data cut short."""
    png = scene_png(width, height)
    url: dict[str, str] = {"url": data_url(png[:-40] if truncated else png)}
    if detail is not None:
        url["detail"] = detail
    return {"type": "image_url", "image_url": url}


def chat(*parts: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    content = [*parts, {"type": "text", "text": "what is there"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 3}
    return body | {"temperature": 0, "stream": stream}


async def test_images_of_any_size_become_their_own_token_counts(qwen: LoadedModel) -> None:
    async with serving(qwen) as client:
        text = await client.post("/v1/chat/completions", json=chat())
        small = await client.post("/v1/chat/completions", json=chat(image_part(16, 16)))
        wide = await client.post("/v1/chat/completions", json=chat(image_part(48, 24)))
        both = await client.post(
            "/v1/chat/completions", json=chat(image_part(16, 16), image_part(48, 24))
        )
        streamed = await client.post(
            "/v1/chat/completions", json=chat(image_part(48, 24), stream=True)
        )
    prompt = {name: r.json()["usage"]["prompt_tokens"] for name, r in
              {"text": text, "small": small, "wide": wide, "both": both}.items()}  # fmt: skip
    image_tokens = {name: prompt[name] - prompt["text"] - 2 for name in ("small", "wide")}
    assert image_tokens == {"small": 16 * 16 // TOKEN_PIXELS, "wide": 48 * 24 // TOKEN_PIXELS}
    assert prompt["both"] == prompt["text"] + sum(image_tokens.values()) + 4
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")


async def test_caption_and_qa_go_through_the_chat_template(qwen: LoadedModel) -> None:
    setting = "Say in a few words what you see in this picture, please."
    async with serving(qwen, caption_prompt=setting) as client:
        upload = {"image": ("scene.png", scene_png(32, 16), "image/png")}
        caption = await client.post("/v1/caption", files=upload, data={"max_tokens": "2"})
        explicit = await client.post(
            "/v1/caption", files=upload, data={"max_tokens": "2", "prompt": setting}
        )
        qa = await client.post(
            "/v1/qa", files=upload, data={"question": "what colour", "max_tokens": "2"}
        )
    assert caption.status_code == explicit.status_code == qa.status_code == 200
    tokens = [r.json()["usage"]["prompt_tokens"] for r in (caption, explicit, qa)]
    assert tokens[0] == tokens[1] > tokens[2] > 32 * 16 // TOKEN_PIXELS


async def test_refusals_name_their_numbers_and_leave_nothing(qwen: LoadedModel) -> None:
    async with serving(qwen, max_image_tokens_per_request=20, max_images_per_request=2) as client:
        over_cap = await client.post("/v1/chat/completions", json=chat(image_part(48, 32)))
        message = assert_error(over_cap, 400)["message"]
        assert "24 tokens" in message and "at most 20" in message
        three = [image_part(16, 16)] * 3
        assert_error(await client.post("/v1/chat/completions", json=chat(*three)), 400)
        bad = await client.post("/v1/chat/completions", json=chat(image_part(16, 16, "ultra")))
        assert_error(bad, 400)
        fits = await client.post("/v1/chat/completions", json=chat(image_part(16, 16, "low")))
        assert fits.status_code == 200
        engine = client._transport.app.state.service.engine  # type: ignore[attr-defined]
        stats = engine._core.snapshot()
        assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0


async def test_the_cap_is_checked_from_the_header_before_any_pixel_is_decoded(
    qwen: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[tuple[int, int]] = []
    real = media.decode_pixels

    def recording(image: Image.Image, param: str = "image") -> Image.Image:
        decoded.append(image.size)
        return real(image, param)

    monkeypatch.setattr(media, "decode_pixels", recording)
    async with serving(qwen, max_image_tokens_per_request=20) as client:
        over = await client.post("/v1/chat/completions", json=chat(image_part(48, 32, None, True)))
        under = await client.post("/v1/chat/completions", json=chat(image_part(16, 16, None, True)))
        second_over = await client.post(
            "/v1/chat/completions",
            json=chat(image_part(16, 16), image_part(40, 32, None, True)),
        )
    assert "24 tokens" in assert_error(over, 400)["message"]
    assert "could not be decoded" in assert_error(under, 400)["message"]  # the body is broken
    message = assert_error(second_over, 400)["message"]  # 4 + 20 tokens
    assert "24 tokens" in message and "at most 20" in message
    assert decoded == [(16, 16), (16, 16)]  # neither over-cap image was decoded


def test_vision_time_and_image_tokens_are_observed() -> None:
    before = (
        sample("mmgpt_vision_encoder_seconds_count"),
        sample("mmgpt_vision_encoder_seconds_sum"),
    )
    recorder = metrics.EngineStatsRecorder()
    recorder.record(StatsUpdate(IDLE, StepStats(0.01, 8, 1)))  # no new image: not observed
    recorder.record(StatsUpdate(IDLE, StepStats(0.01, 8, 1, vision_encoder_seconds=0.25)))
    after = sample("mmgpt_vision_encoder_seconds_count"), sample("mmgpt_vision_encoder_seconds_sum")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0.25)
