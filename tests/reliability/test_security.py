"""Security: keys, remote images, size caps before reading, no way to the file system, loopback.

- API keys: every configured key is compared (in constant time) on every request,
  and no key, right or wrong, reaches the server's log at info level.
- Remote image URLs: only allow-listed hosts, only public addresses, whatever the
  DNS answers (mixed, IPv6 forms that carry a private IPv4, rebinding between
  lookups), at every redirect hop; bodies capped while streaming, refused up front
  when declared too large; a slow body times out.
- Request bodies over the cap are refused before they are read.
- No request reaches the file system: file:// and path-like image URLs, model and
  engine names with ../, traversal in paths, upload file names.
- The servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import app.api.middleware
from app.config import Settings
from app.errors import APIError
from app.main import create_app
from app.media import ImageLimits
from app.remote_media import RemoteImageFetcher, is_public_address
from models import LoadedModel, load_model
from tests.api.images import data_url, scene_png
from tests.conftest import SHARED_SERVER_SETTINGS, ServerProcess
from tests.e2e.conftest import assert_error
from tests.reliability.conftest import SMALL_SERVER_KEY
from tests.reliability.faults import in_process
from tests.reliability.procstat import listening_addresses

LIMITS = ImageLimits(max_bytes=10_000, max_pixels=1_000_000)
PUBLIC_V4, PUBLIC_V6 = "93.184.216.34", "2606:4700::1111"
CHUNK = 1000


# ---- API keys ---------------------------------------------------------------------------------


def test_keys_never_reach_the_log_at_info_level(small_server: ServerProcess) -> None:
    wrong = "sk-wrong-but-secret-9876543210"
    with httpx.Client(base_url=small_server.url, timeout=60) as client:
        for headers in (
            small_server.headers,
            {"Authorization": f"Bearer {wrong}"},
            {"Authorization": f"Basic {SMALL_SERVER_KEY}"},
            {"Authorization": f"Bearer {SMALL_SERVER_KEY}x"},
            {"X-Api-Key": SMALL_SERVER_KEY},
        ):
            client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers)
        metrics = client.get("/metrics").text
    log = small_server.log_path.read_text(errors="replace")
    assert " INFO " in log or "INFO:" in log, "the server did not log at info level"
    for secret in (SMALL_SERVER_KEY, wrong, SMALL_SERVER_KEY[:12]):
        assert secret not in log and secret not in metrics


@pytest.mark.anyio
async def test_every_key_is_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = app.api.middleware.hmac.compare_digest

    def spy(given: bytes, key: bytes) -> bool:
        compared.append((given, key))
        return real(given, key)

    monkeypatch.setattr(app.api.middleware.hmac, "compare_digest", spy)
    keys = ["sk-first", "sk-second", "sk-third"]
    settings = Settings(model=str(tmp_path), api_keys=",".join(keys))  # type: ignore[arg-type]
    service_app = create_app(settings)
    transport = httpx.ASGITransport(app=service_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for given in ("sk-first", "sk-third", "sk-none"):
            compared.clear()
            await client.get("/v1/models", headers={"Authorization": f"Bearer {given}"})
            assert [key for _, key in compared] == [key.encode() for key in keys], given


# ---- remote image URLs (a fake resolver and transport: nothing leaves the process) ------------


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


# ---- size caps before reading -----------------------------------------------------------------


def _exchange(port: int, head: bytes, body_chunks: int = 0) -> tuple[bytes, int]:
    """Sends `head` then (chunked) body data until the server answers; returns the answer
    and how many body bytes were sent by then."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head)
        connection.setblocking(False)
        for _ in range(body_chunks):
            try:
                answer = connection.recv(4096)
                if answer:
                    return answer, sent
            except BlockingIOError:
                pass
            with contextlib.suppress(BlockingIOError, OSError):  # buffers full: try again
                sent += connection.send(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        connection.settimeout(30)
        return connection.recv(4096), sent


def test_declared_and_streamed_bodies_over_the_cap_are_refused_unread(
    server: ServerProcess,
) -> None:
    cap = int(str(SHARED_SERVER_SETTINGS["max_body_bytes"]))
    auth = f"Authorization: Bearer {server.api_key}\r\n"
    declared = (
        f"POST /v1/caption HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: multipart/form-data; "
        f"boundary=b\r\nContent-Length: {50 * cap}\r\n\r\n"
    ).encode()
    answer, _ = _exchange(server.port, declared)  # no body byte sent at all
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    streamed = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    answer, sent = _exchange(server.port, streamed, body_chunks=10_000)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 20 * cap  # answered while the body was still coming (socket buffers aside)


# ---- no way to the file system ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "/etc/passwd", "../../../../etc/passwd", "etc/passwd", "~/.ssh/id_rsa"],
)
def test_image_urls_never_read_files(http: httpx.Client, url: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}
    response = http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]}
    )
    assert_error(response, 400)
    assert "root:" not in response.text


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "~root", "a\u0000b"])
def test_model_names_are_ids_not_paths(http: httpx.Client, name: str) -> None:
    response = http.post("/v1/completions", json={"prompt": "x", "model": name, "max_tokens": 2})
    assert assert_error(response, 404)["code"] == "model_not_found"
    assert "root:" not in response.text


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/..%2F..%2Fetc%2Fpasswd",
        "/v1/models/../../etc/passwd",
        "/../../etc/passwd",
        "/docs/../../../../etc/passwd",
        "/static/..%2f..%2fetc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/etc/passwd",
    ],
)
def test_paths_never_reach_files(server: ServerProcess, path: str) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.api_key}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = b"".join(iter(lambda: connection.recv(65536), b""))
    assert answer.split(b" ")[1] in (b"400", b"404"), answer[:300]
    assert b"root:" not in answer


def test_engine_names_in_the_legacy_path_are_ids(http: httpx.Client) -> None:
    response = http.post("/v1/engines/..%2F..%2Fetc%2Fpasswd/completions", json={"prompt": "x"})
    assert response.status_code == 404 and "root:" not in response.text


def test_upload_file_names_are_never_used(http: httpx.Client, tmp_path: Path) -> None:
    target = tmp_path / "pwned.png"
    files = {"image": (f"../../../../../..{target}", scene_png(), "image/png")}
    response = http.post("/v1/caption", files=files, data={"max_tokens": "2"})
    assert response.status_code == 200, response.text
    assert not target.exists()


def test_data_urls_are_the_only_local_images(http: httpx.Client) -> None:
    part = {"type": "image_url", "image_url": {"url": data_url(scene_png())}}
    body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


# ---- loopback only ----------------------------------------------------------------------------


def test_servers_listen_on_loopback_only(
    server: ServerProcess, small_server: ServerProcess
) -> None:
    assert Settings.model_fields["host"].default == "127.0.0.1"
    for process in (server, small_server):
        assert listening_addresses(process.process.pid) == {"127.0.0.1"}
