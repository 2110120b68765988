"""Image intake: accepted formats, caps before decoding, orientation, colour conversion."""

from __future__ import annotations

import base64
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from app.errors import APIError
from app.media import (
    ImageIntake,
    ImageLimits,
    content_hash,
    decode_data_url,
    decode_pixels,
    read_header,
    to_rgb,
)
from tests.api.images import encode, png_declaring, scene, scene_png

LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=1_000_000)


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """ImageIntake's steps before preprocessing: the header read and checked, then decoded."""
    return decode_pixels(read_header(data, limits))


def _status(call: object) -> int:
    with pytest.raises(APIError) as caught:
        call()  # type: ignore[operator]
    return caught.value.status_code


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(encode(scene(), fmt), LIMITS)
    assert image.mode == "RGB" and image.size == (48, 40)
    red = np.asarray(image)[2, 2].astype(int)
    assert red[0] > 200 and red[2] < 60  # the red corner survived the codec


def test_same_pixels_in_different_files_hash_the_same() -> None:
    from_png = decode_image(encode(scene(), "PNG"), LIMITS)
    from_bmp = decode_image(encode(scene(), "BMP"), LIMITS)
    assert content_hash(from_png) == content_hash(from_bmp)
    assert content_hash(from_png) != content_hash(decode_image(scene_png(40, 48), LIMITS))


@pytest.mark.parametrize(
    "data",
    [b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"<html></html>", b"plain text", b"\x00" * 64],
)
def test_other_content_is_unsupported_media(data: bytes) -> None:
    assert _status(lambda: decode_image(data, LIMITS)) == 415


def test_tiff_is_not_accepted() -> None:
    assert _status(lambda: decode_image(encode(scene(), "TIFF"), LIMITS)) == 415


def test_empty_and_truncated_images_are_bad_requests() -> None:
    assert _status(lambda: decode_image(b"", LIMITS)) == 400
    png = scene_png(64, 64)
    assert _status(lambda: decode_image(png[: len(png) // 2], LIMITS)) == 400
    jpeg = encode(scene(64, 64), "JPEG")
    assert _status(lambda: decode_image(jpeg[:40], LIMITS)) in (400, 415)


def test_byte_cap_is_413() -> None:
    small = ImageLimits(max_bytes=100, max_pixels=1_000_000)
    assert _status(lambda: decode_image(scene_png(), small)) == 413


def test_pixel_cap_is_read_from_the_header_before_decoding() -> None:
    bomb = png_declaring(30_000, 30_000)  # 900 MP declared in a few dozen bytes
    assert len(bomb) < 200
    assert _status(lambda: decode_image(bomb, LIMITS)) == 413
    assert _status(lambda: decode_image(png_declaring(1001, 1000), LIMITS)) == 413


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    jpeg = encode(scene(60, 30), "JPEG", exif=exif)
    assert decode_image(jpeg, LIMITS).size == (30, 60)


def test_first_frame_of_an_animated_gif() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    pixel = np.asarray(decode_image(gif, LIMITS))[0, 0].astype(int)
    assert pixel[0] > 200 and pixel[1] < 60


def test_palette_with_transparency_goes_over_white() -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    rgb = decode_image(encode(palette, "PNG", transparency=0), LIMITS)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)


def test_rgba_alpha_goes_over_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    grey = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    value = decode_image(encode(grey, "PNG"), LIMITS).getpixel((0, 0))
    assert isinstance(value, tuple) and 120 <= value[0] <= 135


def test_cmyk_jpeg_converts() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    pixel = decode_image(encode(cmyk, "JPEG"), LIMITS).getpixel((0, 0))
    assert isinstance(pixel, tuple) and pixel[0] > 200 and pixel[1] < 60


def test_extreme_aspect_ratios_decode() -> None:
    assert decode_image(scene_png(1, 1), LIMITS).size == (1, 1)
    assert decode_image(encode(Image.new("RGB", (10_000, 1)), "PNG"), LIMITS).size == (10_000, 1)


def test_data_urls() -> None:
    png = scene_png()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert decode_data_url(url, LIMITS, "url") == png
    bad = [
        ("data:image/png;base64,@@@@", 400),
        ("data:image/png," + "A" * 8, 400),
        ("data:text/plain;base64,aGVsbG8=", 415),
        ("data:image/png;base64," + "A" * 2_000_000, 413),
    ]
    for url, status in bad:
        assert _status(lambda url=url: decode_data_url(url, LIMITS, "url")) == status, url


def _small_clip_intake() -> ImageIntake:
    """CLIP preprocessing to 32x32 pixels."""
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return ImageIntake(processor, LIMITS)


@pytest.mark.parametrize(("side", "in_thread"), [(64, False), (128, False), (129, True)])
def test_only_larger_images_go_to_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch, side: int, in_thread: bool
) -> None:
    """A worker thread's round trip costs more than decoding a small image inline."""
    threaded: list[bool] = []
    real_run_sync = anyio.to_thread.run_sync

    async def recording_run_sync(*args: Any, **kwargs: Any) -> Any:
        threaded.append(True)
        return await real_run_sync(*args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", recording_run_sync)
    intake = _small_clip_intake()
    loaded = anyio.run(intake.load, scene_png(side, side))
    assert loaded.pixel_values.shape == (3, 32, 32)
    assert threaded == ([True] if in_thread else [])


def test_an_inline_decode_fails_as_the_threaded_one_does() -> None:
    intake = _small_clip_intake()
    truncated = scene_png(64, 64)[:-40]  # a readable header, a broken body
    with pytest.raises(APIError) as caught:
        anyio.run(intake.load, truncated)
    assert caught.value.status_code == 400
