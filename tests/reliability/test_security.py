"""Security: keys, remote images, size caps before reading, no way to the file system, loopback.

- API keys: every configured key is compared (in constant time) on every request,
  and no key, right or wrong, reaches the server's log at info level.
- Remote image URLs: see test_remote_images.py.
- Request bodies over the cap are refused before they are read.
- No request reaches the file system: file:// and path-like image URLs, model and
  engine names with ../, traversal in paths, upload file names.
- The servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import httpx
import pytest

import app.api.middleware
from app.config import Settings
from app.main import create_app
from tests.api.images import data_url, scene_png
from tests.conftest import SHARED_SERVER_SETTINGS, ServerProcess
from tests.e2e.conftest import assert_error
from tests.reliability.conftest import SMALL_SERVER_KEY
from tests.reliability.procstat import listening_addresses

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
