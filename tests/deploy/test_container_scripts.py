"""The scripts that run inside the images or beside the stack: the health probe, the torch
installer of the build, and the pieces of the stack check that need no stack."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from tests.deploy.conftest import DOCKER_DIR, load_docker_module


class ReadyServer(ThreadingHTTPServer):
    ready_status = 503  # while the model loads


class ReadyHandler(BaseHTTPRequestHandler):
    """Answers /ready with the server's current status code."""

    server: ReadyServer

    def do_GET(self) -> None:
        status = self.server.ready_status if self.path == "/ready" else 404
        self.send_response(status)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean


@pytest.fixture
def ready_server() -> Iterator[ReadyServer]:
    server = ReadyServer(("127.0.0.1", 0), ReadyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    return load_docker_module("healthcheck")


def test_health_probe_follows_ready(
    healthcheck: ModuleType, ready_server: ReadyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMGPT_PORT", str(ready_server.server_address[1]))
    assert healthcheck.main() == 1
    ready_server.ready_status = 200
    assert healthcheck.main() == 0


def test_health_probe_fails_when_nothing_listens(
    healthcheck: ModuleType, ready_server: ReadyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = ready_server.server_address[1]
    ready_server.shutdown()
    ready_server.server_close()
    monkeypatch.setenv("MMGPT_PORT", str(port))
    assert healthcheck.main() == 1


def run_install_torch(tmp_path: Path, variant: str, index: str) -> tuple[int, list[str]]:
    """Runs docker/install-torch.sh with a pip that records its arguments."""
    record = tmp_path / "pip-args"
    pip = tmp_path / "pip"
    pip.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    pip.chmod(0o755)
    script = DOCKER_DIR / "install-torch.sh"
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    command = ["sh", str(script), str(pip), variant, "2.13.0", str(wheels), index]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    args = record.read_text().splitlines() if record.exists() else []
    return result.returncode, args


def test_cpu_torch_comes_from_a_wheel_when_there_is_one(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").touch()
    status, args = run_install_torch(tmp_path, "cpu", "https://cpu.example/simple")
    assert status == 0
    assert args[-1] == "torch==2.13.0"
    assert {"--no-index", "--no-deps", "--find-links"} <= set(args)
    assert "--index-url" not in args


def test_cpu_torch_comes_from_the_cpu_index_without_a_wheel(tmp_path: Path) -> None:
    status, args = run_install_torch(tmp_path, "cpu", "https://cpu.example/simple")
    assert status == 0
    assert args[args.index("--index-url") + 1] == "https://cpu.example/simple"
    status, args = run_install_torch(tmp_path, "cpu", "")
    assert status == 0
    assert "--index-url" not in args  # the default index


def test_cuda_torch_comes_from_the_default_index(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").touch()
    status, args = run_install_torch(tmp_path, "cuda", "https://cpu.example/simple")
    assert status == 0
    assert args == ["install", "--no-cache-dir", "torch==2.13.0"]


def test_unknown_torch_variant_is_refused(tmp_path: Path) -> None:
    status, args = run_install_torch(tmp_path, "rocm", "")
    assert status == 2
    assert args == []


@pytest.fixture(scope="module")
def check_stack() -> Iterator[ModuleType]:
    # check_stack.py imports dashboard.py as its neighbour, as when run as a script
    sys.path.insert(0, str(DOCKER_DIR))
    try:
        yield load_docker_module("check_stack")
    finally:
        sys.path.remove(str(DOCKER_DIR))


def test_stack_check_sends_a_real_png(check_stack: ModuleType) -> None:
    image = Image.open(io.BytesIO(check_stack.png_image(size=32)))
    image.load()
    assert image.size == (32, 32)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((31, 31)) == (255, 255, 255)


def test_stack_check_finds_generated_text(check_stack: ModuleType) -> None:
    completion = {"choices": [{"text": " a red square", "index": 0}], "usage": {}}
    chat = {"choices": [{"message": {"role": "assistant", "content": "a red square"}}]}
    assert check_stack.texts_in(completion) == [" a red square"]
    assert check_stack.texts_in(chat) == ["a red square"]
    assert check_stack.texts_in({"choices": [{"text": ""}]}) == []
