"""Remote image URLs: allow-listed hosts, public addresses only, whatever DNS and redirects say.

A fake resolver and transport stand in for the network (nothing leaves the
process): private answers in every form (mixed with public ones, loopback,
link-local, cloud metadata, IPv6 forms that carry a private IPv4), DNS that
rebinds between lookups, redirects to private, odd or other-scheme targets,
bodies over the cap (streamed or declared) and slow bodies. One test goes
through the API with the real resolver: localhost on the allow-list still
resolves to loopback, and is refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from app.errors import APIError
from app.media import ImageLimits
from app.remote_media import RemoteImageFetcher, is_public_address
from models import LoadedModel, load_model
from tests.api.images import scene_png
from tests.e2e.conftest import assert_error
from tests.reliability.faults import in_process

LIMITS = ImageLimits(max_bytes=10_000, max_pixels=1_000_000)
PUBLIC_V4, PUBLIC_V6 = "93.184.216.34", "2606:4700::1111"
CHUNK = 1000


def _resolver(answers: dict[str, list[Any]]) -> Callable[[str, int], Any]:
    """Each host's answers in turn (a list of address lists); the last one repeats."""
    calls: dict[str, int] = {}

    async def resolve(host: str, port: int) -> list[str]:
        turn = calls.get(host, 0)
        calls[host] = turn + 1
        sequence = answers[host]
        return list(sequence[min(turn, len(sequence) - 1)])

    return resolve


def _fetcher(
    handler: Callable[[httpx.Request], httpx.Response],
    answers: dict[str, list[Any]],
    timeout_s: float = 5.0,
) -> RemoteImageFetcher:
    return RemoteImageFetcher(
        list(answers),
        LIMITS,
        timeout_s,
        resolver=_resolver(answers),
        transport=httpx.MockTransport(handler),
    )


def _never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no request may be sent, but one went to {request.url}")


async def _refused(fetcher: RemoteImageFetcher, url: str) -> int:
    with pytest.raises(APIError) as caught:
        await fetcher.fetch(url, "url")
    assert 400 <= caught.value.status_code < 500
    return caught.value.status_code


@pytest.mark.anyio
@pytest.mark.parametrize(
    "addresses",
    [
        [PUBLIC_V4, "10.0.0.7"],  # one private answer among public ones
        ["127.0.0.1"],
        ["::1"],
        ["169.254.169.254"],  # cloud metadata
        ["fe80::1%eth0"],
        ["::ffff:127.0.0.1"],  # IPv4-mapped
        ["64:ff9b::a00:7"],  # NAT64 of 10.0.0.7
        ["2002:a00:7::1"],  # 6to4 of 10.0.0.7
        ["::10.0.0.7"],  # IPv4-compatible
        ["0.0.0.0"],
        ["100.64.0.1"],  # carrier-grade NAT
        [],
    ],
)
async def test_private_answers_are_refused_before_any_request(addresses: list[str]) -> None:
    fetcher = _fetcher(_never, {"images.example.com": [addresses]})
    assert await _refused(fetcher, "https://images.example.com/a.png") == 400


def test_public_forms_stay_public() -> None:
    for address in (PUBLIC_V4, PUBLIC_V6, "::ffff:93.184.216.34", "64:ff9b::5db8:d822"):
        assert is_public_address(address), address


@pytest.mark.anyio
async def test_the_connection_goes_to_the_checked_address_even_if_dns_rebinds() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200, content=scene_png())

    answers = {"images.example.com": [[PUBLIC_V4], ["127.0.0.1"]]}  # public first, then not
    fetcher = _fetcher(handler, answers)
    assert await fetcher.fetch("https://images.example.com/a.png", "url") == scene_png()
    assert seen == [PUBLIC_V4]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1/a.png",
        "http://[::1]/a.png",
        "http://2130706433/a.png",  # 127.0.0.1 as one decimal number
        "http://0x7f.1/a.png",
        "http://images.example.com@10.0.0.7/a.png",  # userinfo: the host is 10.0.0.7
        "//internal.example.com/a.png",  # scheme-relative, to a private host
        "file:///etc/passwd",
        "gopher://images.example.com/a.png",
        "http://elsewhere.example.org/a.png",
    ],
)
async def test_every_redirect_hop_is_checked(location: str) -> None:
    sent: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url)
        return httpx.Response(302, headers={"location": location})

    answers = {"images.example.com": [[PUBLIC_V4]], "internal.example.com": [["10.0.0.7"]]}
    assert await _refused(_fetcher(handler, answers), "https://images.example.com/x") == 400
    assert len(sent) == 1  # the redirect target was never requested


@pytest.mark.anyio
@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "http://127.0.0.1/a.png",
        "http://localhost/a.png",
        "http://images.example.com.evil.org/a.png",
        "http://images.example.com@127.0.0.1/a.png",
        "ftp://images.example.com/a.png",
    ],
)
async def test_urls_off_the_list_are_refused_before_resolving(url: str) -> None:
    def no_dns(host: str, port: int) -> Any:
        raise AssertionError(f"{host} was resolved")

    fetcher = RemoteImageFetcher(["images.example.com"], LIMITS, 5.0, resolver=no_dns)
    assert await _refused(fetcher, url) == 400


def _counting_body(total_chunks: int, pulled: list[int], delay_s: float = 0.0) -> Any:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(total_chunks):
            pulled.append(CHUNK)
            if delay_s:
                await anyio.sleep(delay_s)
            yield b"x" * CHUNK

    return body()


@pytest.mark.anyio
async def test_bodies_are_capped_while_streaming_and_refused_when_declared() -> None:
    pulled: list[int] = []

    def undeclared(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_counting_body(1000, pulled))  # 1 MB, no length

    fetcher = _fetcher(undeclared, {"images.example.com": [[PUBLIC_V4]]})
    assert await _refused(fetcher, "https://images.example.com/big") == 413
    assert sum(pulled) <= LIMITS.max_bytes + CHUNK  # stopped at the cap, not at the end

    pulled.clear()

    def declared(request: httpx.Request) -> httpx.Response:
        headers = {"content-length": str(1000 * CHUNK)}
        return httpx.Response(200, headers=headers, content=_counting_body(1000, pulled))

    fetcher = _fetcher(declared, {"images.example.com": [[PUBLIC_V4]]})
    assert await _refused(fetcher, "https://images.example.com/big") == 413
    assert pulled == []  # refused on the header alone


@pytest.mark.anyio
async def test_a_slow_body_times_out() -> None:
    pulled: list[int] = []

    def slow(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_counting_body(100, pulled, delay_s=5.0))

    fetcher = _fetcher(slow, {"images.example.com": [[PUBLIC_V4]]}, timeout_s=0.2)
    assert await _refused(fetcher, "https://images.example.com/slow") == 400
    assert len(pulled) <= 1


@pytest.fixture(scope="module")
def tiny_llava(tiny_llava_dir: Path) -> LoadedModel:
    return load_model(tiny_llava_dir)


@pytest.mark.anyio
async def test_a_real_resolver_through_the_api_refuses_loopback(tiny_llava: LoadedModel) -> None:
    """localhost is on the allow-list here; its real DNS answer (loopback) still is not."""
    async with in_process(tiny_llava, allowed_media_domains="localhost") as (_, client):
        part = {"type": "image_url", "image_url": {"url": "http://localhost:9/a.png"}}
        body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
        error = assert_error(await client.post("/v1/chat/completions", json=body), 400)
        assert "public address" in error["message"]
