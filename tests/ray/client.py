"""HTTP clients of mmgpt behind Ray Serve's proxy: requests that remember who served them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.ray_serve import REPLICA_HEADER, REPLICA_PATH
from tests.api.images import scene_png

REQUEST_TIMEOUT_S = 120.0
MAX_ATTEMPTS = 20  # per request: failures come from a dead replica, a handful at most
GENERATION = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
ENDPOINTS = ("caption", "completions")


@dataclass
class Served:
    """One request that ended in a 200 from `replica`; `failures` are the attempts before it,
    `started` is when the successful attempt was sent (time.monotonic())."""

    endpoint: str
    replica: str
    started: float
    failures: list[str] = field(default_factory=list)


def send(client: httpx.Client, endpoint: str) -> httpx.Response:
    if endpoint == "caption":
        form = {name: str(value).lower() for name, value in GENERATION.items()}
        files = {"image": ("scene.png", scene_png(), "image/png")}
        return client.post("/v1/caption", data=form, files=files)
    return client.post("/v1/completions", json={"prompt": "a red square", **GENERATION})


def send_until_served(client: httpx.Client, endpoint: str, deadline: float) -> Served:
    """Sends one request again after each failure until it succeeds; fails past
    MAX_ATTEMPTS or the deadline."""
    failures: list[str] = []
    while len(failures) < MAX_ATTEMPTS and time.monotonic() < deadline:
        started = time.monotonic()
        try:
            response = send(client, endpoint)
        except httpx.HTTPError as error:
            failures.append(type(error).__name__)
            continue
        if response.status_code == 200:
            assert response.json()["usage"]["completion_tokens"] == GENERATION["max_tokens"]
            return Served(endpoint, response.headers[REPLICA_HEADER], started, failures)
        failures.append(str(response.status_code))
    raise AssertionError(f"{endpoint} not served; failures: {failures}")


def concurrent_round(base_url: str, per_endpoint: int, deadline: float) -> list[Served]:
    """`per_endpoint` captions and as many completions, all in flight at once."""
    endpoints = [name for name in ENDPOINTS for _ in range(per_endpoint)]
    with (
        httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client,
        ThreadPoolExecutor(max_workers=len(endpoints)) as pool,
    ):
        futures = [pool.submit(send_until_served, client, name, deadline) for name in endpoints]
        return [future.result() for future in futures]


class SteadyLoad:
    """Clients that each send request after request until stopped, so that requests are
    in flight on every replica at any moment; `wait_for` waits on what has been served."""

    def __init__(self, base_url: str, per_endpoint: int, deadline: float) -> None:
        self.base_url = base_url
        self.endpoints = [name for name in ENDPOINTS for _ in range(per_endpoint)]
        self.deadline = deadline
        self.served: list[Served] = []
        self.error: AssertionError | None = None
        self.changed = threading.Condition()
        self.stopped = threading.Event()

    def run(self, pool: ThreadPoolExecutor) -> list[Any]:
        return [pool.submit(self._client, endpoint) for endpoint in self.endpoints]

    def _client(self, endpoint: str) -> None:
        with httpx.Client(base_url=self.base_url, timeout=REQUEST_TIMEOUT_S) as client:
            while not self.stopped.is_set():
                try:
                    served = send_until_served(client, endpoint, self.deadline)
                except AssertionError as error:
                    self._record(error)
                    raise
                self._record(served)

    def _record(self, outcome: Served | AssertionError) -> None:
        with self.changed:
            if isinstance(outcome, Served):
                self.served.append(outcome)
            else:
                self.error = outcome
            self.changed.notify_all()

    def wait_for(self, condition: Callable[[list[Served]], bool]) -> bool:
        """Blocks until `condition(served)` holds (True) or the deadline passes (False);
        raises at once what made a client give up."""
        with self.changed:
            held = self.changed.wait_for(
                lambda: self.error is not None or condition(self.served),
                timeout=max(0.0, self.deadline - time.monotonic()),
            )
            if self.error is not None:
                raise self.error
            return held


def replicas_seen(base_url: str, count: int, attempts: int = 200) -> dict[str, dict[str, Any]]:
    """GET /replica until `count` distinct replicas answered: {replica tag: its description}."""
    found: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
        for _ in range(attempts):
            info = client.get(REPLICA_PATH).json()
            found[info["replica"]] = info
            if len(found) == count:
                return found
    raise AssertionError(f"only {sorted(found)} answered {attempts} GET {REPLICA_PATH}")
