"""HTTP clients of mmgpt behind Ray Serve's proxy: requests that remember who served them."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.ray_serve import REPLICA_HEADER, REPLICA_PATH
from tests.api.images import scene_png

REQUEST_TIMEOUT_S = 120.0
GENERATION = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
ENDPOINTS = ("caption", "completions")


@dataclass
class Served:
    """One request that ended in a 200, after `attempts` tries; `failures` says what came first."""

    endpoint: str
    replica: str
    attempts: int
    failures: list[str] = field(default_factory=list)


def send(client: httpx.Client, endpoint: str) -> httpx.Response:
    if endpoint == "caption":
        form = {name: str(value).lower() for name, value in GENERATION.items()}
        files = {"image": ("scene.png", scene_png(), "image/png")}
        return client.post("/v1/caption", data=form, files=files)
    return client.post("/v1/completions", json={"prompt": "a red square", **GENERATION})


def send_until_served(client: httpx.Client, endpoint: str, deadline: float) -> Served:
    """Sends one request again after each failure until it succeeds; fails at `deadline`."""
    failures: list[str] = []
    while time.monotonic() < deadline:
        try:
            response = send(client, endpoint)
        except httpx.HTTPError as error:
            failures.append(type(error).__name__)
            continue
        if response.status_code == 200:
            assert response.json()["usage"]["completion_tokens"] == GENERATION["max_tokens"]
            replica = response.headers[REPLICA_HEADER]
            return Served(endpoint, replica, len(failures) + 1, failures)
        failures.append(str(response.status_code))
    raise AssertionError(f"{endpoint} not served before the deadline; failures: {failures}")


def concurrent_round(base_url: str, per_endpoint: int, deadline: float) -> list[Served]:
    """`per_endpoint` captions and as many completions, all in flight at once."""
    endpoints = [name for name in ENDPOINTS for _ in range(per_endpoint)]
    with (
        httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client,
        ThreadPoolExecutor(max_workers=len(endpoints)) as pool,
    ):
        futures = [pool.submit(send_until_served, client, name, deadline) for name in endpoints]
        return [future.result() for future in futures]


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
