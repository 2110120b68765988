"""An adversarial image corpus, built in memory: broken files, bombs, impostors and odd modes.

Each entry says which statuses are a right answer: a decodable picture must be
served (200); a broken one refused with a 4xx. "Corrupted" files are allowed
either, since lossy decoders legitimately decode damaged data.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tests.api.images import encode, png_declaring, scene

OK, BAD, TOO_LARGE, UNSUPPORTED = 200, 400, 413, 415


@dataclass(frozen=True)
class Specimen:
    name: str
    data: bytes
    allowed: frozenset[int]
    content_type: str = "image/png"


def _specimen(name: str, data: bytes, *allowed: int, content_type: str = "image/png") -> Specimen:
    return Specimen(name, data, frozenset(allowed), content_type)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _corrupt(data: bytes, seed: int) -> bytes:
    """Overwrites 32 bytes in the middle half with random ones."""
    rng = random.Random(seed)
    damaged = bytearray(data)
    for _ in range(32):
        damaged[rng.randrange(len(data) // 4, 3 * len(data) // 4)] = rng.randrange(256)
    return bytes(damaged)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def png_with_chunk_before_end(image: Image.Image, chunk: bytes) -> bytes:
    """A valid PNG with one extra chunk placed before IEND."""
    data = encode(image)
    return data[:-12] + chunk + data[-12:]


def text_chunk_bomb() -> bytes:
    """A PNG whose zTXt chunk inflates to 64 MB (PIL caps text chunks at 1 MB)."""
    payload = b"Comment\x00\x00" + zlib.compress(b"\x00" * (64 << 20), 9)
    return png_with_chunk_before_end(scene(), _png_chunk(b"zTXt", payload))


def gif_declaring(width: int, height: int) -> bytes:
    """A tiny GIF whose screen and frame claim width x height pixels."""
    data = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen
    frame = data.index(b",")  # image descriptor
    data[frame + 5 : frame + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A tiny JPEG whose SOF header claims width x height pixels."""
    data = bytearray(encode(scene(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    """A tiny extended WebP whose VP8X canvas claims width x height pixels."""
    data = bytearray(encode(scene(16, 16), "WEBP", lossless=True))
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + bytes(data[12:])
    return b"RIFF" + struct.pack("<I", len(body)) + body


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(scene(8, 8), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [
        Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))
    ]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def first_gif_frame_png(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return encode(image.convert("RGB"))


def exif_rotated_jpeg() -> bytes:
    """A JPEG stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(scene(48, 24), "JPEG", exif=exif.tobytes(), quality=95)


def cmyk_jpeg() -> bytes:
    return encode(scene().convert("CMYK"), "JPEG")


def png16_grey() -> bytes:
    grey = (np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 27).astype(np.uint16)
    image = Image.fromarray(grey)  # mode I;16
    assert image.mode == "I;16", image.mode
    return encode(image)


def palette_png_with_transparency() -> bytes:
    image = scene().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return encode(image, transparency=0)


def grey_alpha_png() -> bytes:
    return encode(scene().convert("LA"))


def transparent_rgba_png() -> bytes:
    return encode(Image.new("RGBA", (40, 40), (255, 0, 0, 0)))


def white_png() -> bytes:
    return encode(Image.new("RGB", (40, 40), (255, 255, 255)))


def build() -> list[Specimen]:
    png, jpeg = encode(_noise(64, 48)), encode(_noise(64, 48), "JPEG")
    webp, gif = encode(_noise(64, 48), "WEBP"), encode(_noise(64, 48).convert("P"), "GIF")
    return [
        _specimen("empty", b"", BAD),
        _specimen("one byte", b"\x89", BAD, UNSUPPORTED),
        _specimen("png signature only", png[:8], BAD, UNSUPPORTED),
        _specimen("png truncated", png[: len(png) // 2], BAD),
        _specimen("jpeg truncated", jpeg[: len(jpeg) // 2], BAD, content_type="image/jpeg"),
        _specimen("webp truncated", webp[: len(webp) // 2], BAD, content_type="image/webp"),
        _specimen("gif truncated", gif[: len(gif) // 2], OK, BAD, content_type="image/gif"),
        _specimen("png corrupted", _corrupt(png, 1), BAD),
        _specimen("jpeg corrupted", _corrupt(jpeg, 2), OK, BAD, content_type="image/jpeg"),
        _specimen("webp corrupted", _corrupt(webp, 3), OK, BAD, content_type="image/webp"),
        _specimen("gif corrupted", _corrupt(gif, 4), OK, BAD, content_type="image/gif"),
        _specimen("random bytes", random.Random(5).randbytes(4096), UNSUPPORTED),
        _specimen("png bomb 20000x20000", png_declaring(20_000, 20_000), TOO_LARGE),
        _specimen("png bomb real zeros 5000x5000", encode(Image.new("L", (5000, 5000))), TOO_LARGE),
        _specimen("gif bomb 65535x65535", gif_declaring(65_535, 65_535), TOO_LARGE),
        _specimen("jpeg bomb 65000x65000", jpeg_declaring(65_000, 65_000), TOO_LARGE),
        _specimen("webp bomb 16384x16384", webp_declaring(16_384, 16_384), TOO_LARGE),
        _specimen("bmp bomb 60000x60000", bmp_declaring(60_000, 60_000), TOO_LARGE),
        _specimen("bmp negative size", bmp_declaring(-8, -8), OK, BAD, TOO_LARGE),
        _specimen("png text chunk bomb", text_chunk_bomb(), OK, BAD),
        _specimen(
            "svg", b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'/>", UNSUPPORTED
        ),
        _specimen("html", b"<!doctype html><img src=x onerror=alert(1)>", UNSUPPORTED),
        _specimen("text", b"a picture of a red circle", UNSUPPORTED),
        _specimen("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", UNSUPPORTED),
        _specimen("tiff", encode(scene(), "TIFF"), UNSUPPORTED),
        _specimen("ico", encode(scene(16, 16), "ICO"), UNSUPPORTED),
        _specimen("animated gif", animated_gif(), OK, content_type="image/gif"),
        _specimen("cmyk jpeg", cmyk_jpeg(), OK, content_type="image/jpeg"),
        _specimen("16-bit grey png", png16_grey(), OK),
        _specimen("palette png with transparency", palette_png_with_transparency(), OK),
        _specimen("grey+alpha png", grey_alpha_png(), OK),
        _specimen("1x1", encode(scene(1, 1)), OK),
        _specimen("10000x1", encode(Image.new("RGB", (10_000, 1))), BAD),
        _specimen("1x10000", encode(Image.new("RGB", (1, 10_000))), BAD),
        _specimen("100000x1", encode(Image.new("RGB", (100_000, 1))), BAD),
        _specimen("exif rotated jpeg", exif_rotated_jpeg(), OK, content_type="image/jpeg"),
        _specimen("png sent as text/plain", encode(scene()), OK, content_type="text/plain"),
        _specimen("jpeg sent as image/png", encode(scene(), "JPEG"), OK),
        _specimen(
            "svg sent as image/png", b"<svg xmlns='http://www.w3.org/2000/svg'/>", UNSUPPORTED
        ),
    ]
