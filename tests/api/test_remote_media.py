"""Remote image URLs: allow-list, public addresses only (every hop), pinned address, caps."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from app.errors import APIError
from app.media import ImageLimits
from app.remote_media import RemoteImageFetcher, is_public_address
from tests.api.images import scene_png

pytestmark = pytest.mark.anyio
PUBLIC = {"images.example.com": "93.184.216.34", "cdn.example.com": "151.101.1.69"}
LIMITS = ImageLimits(max_bytes=10_000, max_pixels=1_000_000)


async def fake_resolver(host: str, port: int) -> list[str]:
    answers = {**PUBLIC, "internal.example.com": "10.0.0.7", "rebind.example.com": "127.0.0.1"}
    return [answers[host]]


def fetcher(
    handler: Callable[[httpx.Request], httpx.Response], **kwargs: object
) -> RemoteImageFetcher:
    hosts = [*PUBLIC, "internal.example.com", "rebind.example.com"]
    return RemoteImageFetcher(
        hosts,
        LIMITS,
        5.0,
        resolver=fake_resolver,
        transport=httpx.MockTransport(handler),
    )


async def _status(fetch: RemoteImageFetcher, url: str) -> int:
    with pytest.raises(APIError) as caught:
        await fetch.fetch(url, "url")
    return caught.value.status_code


def test_public_address_classification() -> None:
    assert is_public_address("93.184.216.34")
    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "fe80::1",
                    "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1", "224.0.0.1"):  # fmt: skip
        assert not is_public_address(address), address


async def test_fetch_connects_to_the_checked_address_with_the_original_host() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=scene_png())

    data = await fetcher(handler).fetch("https://images.example.com/a.png", "url")
    assert data == scene_png()
    assert seen[0].url.host == PUBLIC["images.example.com"]
    assert seen[0].headers["host"] == "images.example.com"
    assert seen[0].extensions["sni_hostname"] == "images.example.com"


async def test_hosts_off_the_list_and_private_addresses_are_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request may be sent")

    fetch = fetcher(handler)
    assert await _status(fetch, "https://evil.example.org/a.png") == 400
    assert await _status(fetch, "https://internal.example.com/a.png") == 400
    assert await _status(fetch, "http://rebind.example.com/a.png") == 400
    assert await _status(fetch, "ftp://images.example.com/a.png") == 400


async def test_disabled_without_an_allow_list() -> None:
    fetch = RemoteImageFetcher([], LIMITS, 5.0, resolver=fake_resolver)
    assert await _status(fetch, "https://images.example.com/a.png") == 400


async def test_redirects_are_checked_at_every_hop() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/to-cdn":
            return httpx.Response(302, headers={"location": "https://cdn.example.com/b.png"})
        if request.url.path == "/to-internal":
            return httpx.Response(302, headers={"location": "http://internal.example.com/"})
        if request.url.path == "/loop":
            return httpx.Response(302, headers={"location": "/loop"})
        return httpx.Response(200, content=scene_png())

    fetch = fetcher(handler)
    assert await fetch.fetch("https://images.example.com/to-cdn", "url") == scene_png()
    assert await _status(fetch, "https://images.example.com/to-internal") == 400
    assert await _status(fetch, "https://images.example.com/loop") == 400


async def test_size_cap_and_bad_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/big":
            return httpx.Response(200, content=b"x" * (LIMITS.max_bytes + 1))
        return httpx.Response(404)

    fetch = fetcher(handler)
    assert await _status(fetch, "https://images.example.com/big") == 413
    assert await _status(fetch, "https://images.example.com/missing") == 400
