"""`make serve` (the README's command) reaches /ready and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.api.images import scene_png
from tests.conftest import REPO_ROOT, ServerProcess, free_port

STOP_DEADLINE_S = 60.0


def _venv_installed_by_make() -> bool:
    """True when `make serve` would not reinstall: the .venv stamp is up to date."""
    check = subprocess.run(["make", "-q", ".venv/.installed"], cwd=REPO_ROOT, check=False)
    return check.returncode == 0


def _descendants(pid: int) -> list[int]:
    children_file = Path(f"/proc/{pid}/task/{pid}/children")
    children = (
        [int(child) for child in children_file.read_text().split()]
        if children_file.exists()
        else []
    )
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _server_pid(make_pid: int) -> int:
    for pid in _descendants(make_pid):
        if b"mmgpt" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError("no mmgpt process under make")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_serve_reaches_ready_with_the_default_model(tmp_path: Path) -> None:
    if not _venv_installed_by_make():
        pytest.skip("the .venv is not installed by make (run `make venv`); CI's `make test` is")
    port = free_port()
    # No MMGPT_MODEL: `make serve` must serve the shipped default model by itself.
    env = {key: value for key, value in os.environ.items() if key != "MMGPT_MODEL"}
    env["MMGPT_NUM_THREADS"] = "1"
    log_path = tmp_path / "make-serve.log"
    with log_path.open("wb") as log:
        make = subprocess.Popen(
            ["make", "serve", "HOST=127.0.0.1", f"PORT={port}"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    server = ServerProcess(make, port, log_path)
    try:
        server.wait_ready()
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "mmgpt-scenes"
        caption = httpx.post(
            f"{server.url}/v1/caption",
            files={"image": ("scene.png", scene_png(), "image/png")},
            data={"temperature": "0"},
            timeout=60.0,
        )
        assert caption.status_code == 200, caption.text
        assert caption.json()["choices"][0]["text"].strip()
        os.kill(_server_pid(make.pid), signal.SIGTERM)
        assert make.wait(STOP_DEADLINE_S) == 0, server.log_tail()  # make ends as its server did
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
