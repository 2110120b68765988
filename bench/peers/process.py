"""Start a server process on loopback, wait until it is ready, and stop it and its children."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx


class ServerStartError(RuntimeError):
    """The server exited or did not become ready before its deadline."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """One server in its own process group, so that stopping it reaches every child."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        base_url: str,
        ready_path: str,
        log_path: Path,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.base_url = base_url
        self.ready_path = ready_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, deadline_s: float, poll_s: float = 0.5) -> None:
        """Polls GET ready_path until 200; fails fast if the process exits."""
        give_up = time.monotonic() + deadline_s
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.monotonic() < give_up:
                if self.process is None or self.process.poll() is not None:
                    raise ServerStartError(f"server exited early:\n{self.log_tail()}")
                if self._is_ready(client):
                    return
                time.sleep(poll_s)
        raise ServerStartError(f"not ready after {deadline_s:.0f} s:\n{self.log_tail()}")

    def _is_ready(self, client: httpx.Client) -> bool:
        try:
            return client.get(self.base_url + self.ready_path).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the whole group, then SIGKILL to whatever is left after `grace_s`."""
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the group id is the leader's pid
        _signal_group(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(group, signal.SIGKILL)
            self.process.wait()
        _signal_group(group, signal.SIGKILL)  # children that outlived their parent
        self._wait_group_gone(group, grace_s)
        self.process = None

    def _wait_group_gone(self, group: int, timeout_s: float) -> None:
        """The next contender must not share the CPU with this one's leftovers."""
        give_up = time.monotonic() + timeout_s
        while group_members(group):
            if time.monotonic() > give_up:
                raise RuntimeError(f"processes {group_members(group)} survived SIGKILL")
            time.sleep(0.05)

    def log_tail(self, num_lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc (empty elsewhere)."""
    members = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the ")" that closes the command name: state, ppid, pgrp, ...
            state, _, pgrp = stat_path.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(pgrp) == group and state != "Z":
            members.append(int(stat_path.parent.name))
    return members


def _signal_group(group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signum)
