"""The app in-process on a tiny SmolVLM (warm-up included): an image's prompt tokens follow
its tiles, `detail` "low" reads it as one tile, caption and QA go through the family's
chat template, and the image-token cap counts the tiles' tags too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models import LoadedModel, load_model
from tests.api.images import data_url, scene_png
from tests.api.test_text_model import serving
from tests.e2e.conftest import assert_error
from tests.smolvlm_checkpoints import make_tiny_smolvlm

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(Path(make_tiny_smolvlm(tmp_path_factory.mktemp("smolvlm"))))


def image_part(width: int, height: int, detail: str | None = None) -> dict[str, Any]:
    url: dict[str, str] = {"url": data_url(scene_png(width, height))}
    if detail is not None:
        url["detail"] = detail
    return {"type": "image_url", "image_url": url}


def chat(*parts: dict[str, Any]) -> dict[str, Any]:
    content = [*parts, {"type": "text", "text": "what is there"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0}


def tag_tokens(loaded: LoadedModel, rows: int, cols: int) -> int:
    """Tokens an image of rows x cols tiles becomes, less the template's one image token."""
    text = loaded.image_processor.prompt_text(rows, cols)
    return len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1


async def test_prompt_tokens_follow_the_tiles_and_detail(smolvlm: LoadedModel) -> None:
    async with serving(smolvlm) as client:
        bodies = {
            "text": chat(),
            "square": chat(image_part(48, 48)),  # 3x3 tiles
            "wide": chat(image_part(64, 16)),  # 1x3 tiles
            "low": chat(image_part(48, 48, "low")),  # the global image alone
            "both": chat(image_part(48, 48), image_part(64, 16)),
        }
        replies = {name: await client.post("/v1/chat/completions", json=body)
                   for name, body in bodies.items()}  # fmt: skip
    prompt = {name: reply.json()["usage"]["prompt_tokens"] for name, reply in replies.items()}
    grew = {name: prompt[name] - prompt["text"] - 1 for name in ("square", "wide", "low")}
    square, wide = tag_tokens(smolvlm, 3, 3), tag_tokens(smolvlm, 1, 3)
    assert grew == {"square": square, "wide": wide, "low": tag_tokens(smolvlm, 0, 0)}
    assert prompt["both"] == prompt["text"] + 2 + square + wide


async def test_caption_and_qa_go_through_the_chat_template(smolvlm: LoadedModel) -> None:
    async with serving(smolvlm) as client:
        upload = {"image": ("scene.png", scene_png(32, 16), "image/png")}
        caption = await client.post("/v1/caption", files=upload, data={"max_tokens": "2"})
        qa = await client.post(
            "/v1/qa", files=upload, data={"question": "what colour", "max_tokens": "2"}
        )
    assert caption.status_code == qa.status_code == 200
    assert qa.json()["usage"]["prompt_tokens"] > tag_tokens(smolvlm, 1, 3)


async def test_the_cap_counts_tiles_and_tags_and_leaves_nothing(smolvlm: LoadedModel) -> None:
    async with serving(smolvlm, max_image_tokens_per_request=30) as client:
        over_cap = await client.post("/v1/chat/completions", json=chat(image_part(48, 48)))
        message = assert_error(over_cap, 400)["message"]
        assert "at most 30" in message and 'detail "low"' in message
        fits = await client.post("/v1/chat/completions", json=chat(image_part(48, 48, "low")))
        assert fits.status_code == 200
        engine = client._transport.app.state.service.engine  # type: ignore[attr-defined]
        stats = engine._core.snapshot()
        assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0
