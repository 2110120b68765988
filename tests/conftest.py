"""Fixtures shared by the service tests: tiny checkpoints and real `mmgpt serve` processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
READY_DEADLINE_S = 180.0  # importing torch and loading on 2 busy cores can take a while
# Long enough for generations that outlast a few HTTP round trips (drain, overload tests).
TINY_CONTEXT = 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_tiny_llava_dir(folder: Path, context: int = TINY_CONTEXT) -> Path:
    """The tests' tiny LLaVA, with a longer context than the factory's (RoPE: any length)."""
    from tests.checkpoints import make_tiny_llava

    make_tiny_llava(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["max_position_embeddings"] = context
    config_path.write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava_dir(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoints import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@dataclass
class ServerProcess:
    """A `mmgpt serve` subprocess on a loopback port, with its log kept for failures."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.api_key:
            self.headers = {"Authorization": f"Bearer {self.api_key}"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, deadline_s: float = READY_DEADLINE_S) -> None:
        """Polls /ready until 200; fails early if the process exits."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # poll interval, not a wait for a condition
        raise AssertionError(f"server not ready after {deadline_s} s:\n{self.log_tail()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server ignored SIGTERM:\n{self.log_tail()}") from None


def start_server(
    model_dir: Path, log_dir: Path, *, api_key: str | None = None, **settings: object
) -> ServerProcess:
    """Starts `python -m app.cli serve` (what the `mmgpt` script runs) with MMGPT_* settings."""
    port = free_port()
    env = {**os.environ, "MMGPT_NUM_THREADS": "1", "MMGPT_LOG_LEVEL": "warning"}
    env.update({f"MMGPT_{name.upper()}": str(value) for name, value in settings.items()})
    if api_key:
        env["MMGPT_API_KEYS"] = api_key
    command = [sys.executable, "-m", "app.cli", "serve", "--model", str(model_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    return ServerProcess(process, port, log_path, api_key)


# Small caps make the limit tests cheap: a few hundred kB crosses them.
SHARED_SERVER_SETTINGS: dict[str, object] = {
    "max_image_bytes": 300_000,
    "max_image_pixels": 1_000_000,
    "max_body_bytes": 1_000_000,
}


@pytest.fixture(scope="session")
def server(
    tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One real server for the session: tiny LLaVA, API key required, small size caps."""
    process = start_server(
        tiny_llava_dir, tmp_path_factory.mktemp("logs"), api_key=API_KEY, **SHARED_SERVER_SETTINGS
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()
