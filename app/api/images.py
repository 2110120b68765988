"""Images from requests (uploads and image URLs) into the engine's ImageInput."""

from __future__ import annotations

import anyio
from fastapi import UploadFile

from app.engine.sequence import ImageInput
from app.errors import bad_request
from app.media import ImageIntake, ImageTokenBudget, check_size, decode_data_url
from app.service import Runtime


def image_intake(runtime: Runtime, param: str) -> ImageIntake:
    """The model's image intake, or a 400 for a text-only model."""
    if runtime.images is None or not runtime.info.is_multimodal:
        raise bad_request(f"The model {runtime.model_id} does not accept images.", param)
    return runtime.images


def check_image_count(runtime: Runtime, count: int, param: str) -> None:
    limit = runtime.settings.max_images_per_request
    if count > limit:
        raise bad_request(
            f"A request may hold at most {limit} images; this one has {count}.", param
        )


async def load_upload(runtime: Runtime, upload: UploadFile, param: str = "image") -> ImageInput:
    """A multipart file: its size is checked before it is read into memory."""
    intake = image_intake(runtime, param)
    if upload.size is not None:
        check_size(upload.size, intake.limits, param)
    data = await upload.read(intake.limits.max_bytes + 1)
    return await intake.load(data, param)


async def load_image_url(
    runtime: Runtime, url: str, budget: ImageTokenBudget, param: str, detail: str = "auto"
) -> ImageInput:
    """A chat image part: a base64 data: URL, or an http(s) URL on an allowed host."""
    intake = image_intake(runtime, param)
    if url.startswith("data:"):
        # base64 of a large image takes tens of ms: not on the event loop
        data = await anyio.to_thread.run_sync(decode_data_url, url, intake.limits, param)
    elif url.startswith(("http://", "https://")):
        data = await runtime.fetcher.fetch(url, param)
    else:
        raise bad_request("Image URLs must be data: or http(s) URLs.", param)
    return await intake.load(data, param, detail, budget)
