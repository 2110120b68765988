"""Image intake: caps before decoding, decode, EXIF orientation, RGB, preprocess.

The one image decoder of the service. Sizes are checked before any pixel is
decoded (bytes first, then the pixel count from the header, then the request's image
tokens, which the processor's resize rule counts from the header's size), so a small
file that declares a huge image costs nothing. Decoding and preprocessing run in a
thread pool with bounded concurrency, never on the event loop, never with torch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import time
import warnings
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app import metrics
from app.engine.errors import InvalidRequestError
from app.engine.sequence import ImageInput
from app.engine.validation import check_image_token_cap
from app.errors import APIError, bad_request, from_engine_error, too_large, unsupported_media
from models.processors import image_features, image_tokens_for_size

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
ACCEPTED_NAMES = "PNG, JPEG, WebP, BMP or GIF"
# Decoding is memory-heavy (up to max_image_pixels * 4 bytes per image at once);
# a small pool bounds that however many requests arrive together.
DECODE_CONCURRENCY = 2
# Processors scale the shorter side up to their input size, so a 100000x1 strip (0.1 MP)
# becomes 3.2M x 32 pixels (a GB of floats): the sides may differ by this factor at most.
MAX_ASPECT_RATIO = 50
# Images up to this many pixels are decoded on the event loop: for them a worker thread's
# round trip costs more than the work (a 64x64 PNG decodes and preprocesses in 0.5 ms).
INLINE_DECODE_PIXELS = 128 * 128
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    max_image_tokens: int = 0  # per request; 0: only the context limits them


@dataclass
class ImageTokenBudget:
    """One request's image tokens, added up from each image's header before its pixels are
    decoded; past the cap, the same 400 the engine gives (EXIF rotation swaps the sides,
    which leaves the count unchanged)."""

    cap: int
    fixed_tokens: int  # a fixed-size model's tokens per image
    total: int = 0

    def spend(self, tokens: int) -> None:
        self.total += tokens or self.fixed_tokens
        try:
            check_image_token_cap(self.total, self.cap)
        except InvalidRequestError as error:
            raise from_engine_error(error) from None


def check_size(num_bytes: int, limits: ImageLimits, param: str) -> None:
    if num_bytes > limits.max_bytes:
        raise too_large(
            f"The image is {num_bytes} bytes; the limit is {limits.max_bytes} bytes.", param
        )


def read_header(data: bytes, limits: ImageLimits, param: str = "image") -> Image.Image:
    """Checks the bytes and reads only the header: cheap whatever the picture's size."""
    if not data:
        raise bad_request("The image is empty.", param, code="invalid_image")
    check_size(len(data), limits, param)
    image = _open(data, param)
    _check_pixels(image, limits, param)
    return image


def decode_pixels(image: Image.Image, param: str = "image") -> Image.Image:
    """An image whose header `read_header` accepted -> upright RGB pixels."""
    try:
        image.seek(0)  # the first frame of an animation
        image.load()
        upright = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as error:
        message = f"The image could not be decoded: {error}"
        raise bad_request(message, param, "invalid_image") from None
    return to_rgb(upright)


def _open(data: bytes, param: str) -> Image.Image:
    """Reads only the header; refuses formats outside ACCEPTED_FORMATS."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise unsupported_media(f"Unsupported image type; send {ACCEPTED_NAMES}.", param) from None
    except Image.DecompressionBombError as error:
        raise too_large(f"The image has too many pixels: {error}", param) from None
    except _DECODE_ERRORS as error:
        message = f"The image could not be read: {error}"
        raise bad_request(message, param, "invalid_image") from None


def _check_pixels(image: Image.Image, limits: ImageLimits, param: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise bad_request("The image has no pixels.", param, code="invalid_image")
    if width * height > limits.max_pixels:
        raise too_large(
            f"The image is {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_pixels} pixels.",
            param,
        )


def check_aspect_ratio(image: Image.Image, param: str) -> None:
    """Refuses strips that preprocessing would blow up (see MAX_ASPECT_RATIO)."""
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise bad_request(
            f"The image is {width}x{height}; its longer side may be at most "
            f"{MAX_ASPECT_RATIO} times its shorter side.",
            param,
            code="invalid_image",
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Palette, alpha, 16-bit, CMYK ... -> 8-bit RGB; transparency over white."""
    if image.mode.startswith("I"):  # 16/32-bit grey: scale, do not clip
        grey = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if grey.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(grey * (255.0 / peak), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def content_hash(image: Image.Image) -> str:
    """Hash of the decoded pixels and size: equal pictures share caches whatever the file."""
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def preprocess(image: Image.Image, image_processor: Any, detail: str = "auto") -> ImageInput:
    """RGB image -> its processor's arrays and the number of tokens it becomes."""
    features = image_features(image, image_processor, detail)
    # the same pixels read at another detail are another input to the tower
    key = content_hash(image) if detail == "auto" else f"{content_hash(image)}:{detail}"
    return ImageInput(
        features.pixel_values, key, features.num_tokens, features.extra, features.prompt_text
    )


def decode_data_url(url: str, limits: ImageLimits, param: str) -> bytes:
    """`data:image/...;base64,...` -> the encoded image bytes (size checked before decoding)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise bad_request("Image data URLs must look like data:image/png;base64,....", param)
    media_type = header.removeprefix("data:").removesuffix(";base64").split(";")[0].strip()
    if media_type and not media_type.lower().startswith("image/"):
        raise unsupported_media(f"The data URL holds {media_type}, not an image.", param)
    check_size(len(payload) * 3 // 4, limits, param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        message = "The image data URL is not valid base64."
        raise bad_request(message, param, "invalid_image") from None


class ImageIntake:
    """Decodes and preprocesses images for one loaded model: small ones inline, the rest in
    a bounded pool of worker threads (after the header is read and checked, inline)."""

    def __init__(self, image_processor: Any, limits: ImageLimits, fixed_tokens: int = 0) -> None:
        self.image_processor = image_processor
        self.limits = limits
        self.fixed_tokens = fixed_tokens  # a fixed-size model's tokens per image
        self._limiter = anyio.CapacityLimiter(DECODE_CONCURRENCY)

    def token_budget(self) -> ImageTokenBudget:
        """A new request's image-token tally against the server's cap."""
        return ImageTokenBudget(self.limits.max_image_tokens, self.fixed_tokens)

    async def load(
        self,
        data: bytes,
        param: str = "image",
        detail: str = "auto",
        budget: ImageTokenBudget | None = None,
    ) -> ImageInput:
        """Checked, decoded, preprocessed; `budget` tallies the request's images (None: this
        one alone)."""
        metrics.record_image_received()
        started = time.perf_counter()
        header = read_header(data, self.limits, param)
        budget = budget or self.token_budget()
        budget.spend(self._tokens_from_header(header, param, detail))
        if header.width * header.height <= INLINE_DECODE_PIXELS:
            image_input = self._decode_and_preprocess(header, param, detail)
        else:
            image_input = await anyio.to_thread.run_sync(
                self._decode_and_preprocess, header, param, detail, limiter=self._limiter
            )
        metrics.record_image_preprocessed(time.perf_counter() - started)
        return image_input

    def _tokens_from_header(self, header: Image.Image, param: str, detail: str) -> int:
        try:
            return image_tokens_for_size(self.image_processor, *header.size, detail)
        except ValueError as error:  # a detail that does not exist
            raise bad_request(str(error), param) from None

    def _decode_and_preprocess(self, header: Image.Image, param: str, detail: str) -> ImageInput:
        image = decode_pixels(header, param)
        check_aspect_ratio(image, param)
        try:
            return preprocess(image, self.image_processor, detail)
        except APIError:
            raise
        except Exception as error:  # a processor that cannot handle this picture
            raise bad_request(f"The image could not be preprocessed: {error}", param) from error
