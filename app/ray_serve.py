"""mmgpt as a Ray Serve deployment: the same FastAPI app, one engine per replica.

Each replica is one Ray actor process that builds the app with `create_app`, so it
loads the model once and runs one engine loop, exactly like `mmgpt serve`. Ray's
HTTP proxy spreads requests over the replicas, restarts a replica whose process
dies or whose `check_health` raises, and scales the count on ongoing requests when
an `autoscaling_config` is given.

Ray Serve does not export collectors of `prometheus_client`, and its proxy cannot
address one replica, so each replica serves its own Prometheus endpoint on a port
of its node (the first free one of `metrics_port .. metrics_port + metrics_port_count
- 1`). Every response carries the `x-mmgpt-replica` header, and `GET /replica`
says which replica answered, its process id and its metrics address.

    serve run deploy/ray/serve.yaml                        # a config file
    serve run app.ray_serve:build_app metrics_port=9500    # builder args on the command line

No `from __future__ import annotations` here: Ray reads the builder's annotation at
run time to validate its arguments into `RayServeArgs`.
"""

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from wsgiref.simple_server import WSGIServer

import ray
from fastapi import FastAPI
from prometheus_client import start_http_server
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.main import create_app
from app.service import Service, Status

logger = logging.getLogger("mmgpt.ray_serve")

REPLICA_HEADER = "x-mmgpt-replica"
REPLICA_PATH = "/replica"
LOAD_POLL_S = 0.1  # how often a starting replica looks whether its model has loaded


class RayServeArgs(BaseModel):
    """The builder's arguments: serve.yaml `args:` or `serve run ... KEY=VALUE`."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="mmgpt Settings fields; MMGPT_* variables in the replica's env fill the rest.",
    )
    metrics_port: int = Field(
        default=9500, ge=0, le=65535, description="First per-replica metrics port; 0: any free."
    )
    metrics_port_count: int = Field(
        default=8, ge=1, description="Ports tried from metrics_port on: replicas per node at most."
    )
    metrics_host: str | None = Field(
        default=None, description="Address the metrics ports listen on. Default: the node's IP."
    )
    load_timeout_s: float = Field(
        default=900.0, gt=0, description="A replica whose model has not loaded by then fails."
    )


class MetricsEndpoint:
    """A replica's own Prometheus endpoint, on the first free port of its range."""

    def __init__(self, args: RayServeArgs) -> None:
        self.host = args.metrics_host or ray.util.get_node_ip_address()
        first = args.metrics_port
        self.candidates = [0] if first == 0 else list(range(first, first + args.metrics_port_count))
        self.server: WSGIServer | None = None

    @property
    def port(self) -> int | None:
        return int(self.server.server_port) if self.server else None

    def start(self) -> None:
        for port in self.candidates:
            try:
                self.server, _ = start_http_server(port, self.host)
            except OSError:
                continue  # another replica on this node holds it
            logger.info("Prometheus metrics of this replica: http://%s:%d/", self.host, self.port)
            return
        logger.warning("No free metrics port in %s on %s", self.candidates, self.host)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class ReplicaIdentity:
    """Names the replica on every response and answers GET /replica (outside the /v1 gate)."""

    def __init__(self, app: ASGIApp, describe: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.describe = describe
        self.header = (REPLICA_HEADER.encode(), str(describe()["replica"]).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == REPLICA_PATH and scope["method"] == "GET":
            await self._answer(send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)

    async def _answer(self, send: Send) -> None:
        body = json.dumps(self.describe()).encode()
        headers = [(b"content-type", b"application/json"), self.header]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def wait_until_loaded(service: Service, timeout_s: float) -> None:
    """Returns once the model is loaded; raises if loading failed or outlasts `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    # The service exposes its state, not an event: look at it until it leaves LOADING.
    while service.status is Status.LOADING and time.monotonic() < deadline:
        await asyncio.sleep(LOAD_POLL_S)
    if not service.is_ready:
        raise RuntimeError(f"mmgpt replica did not become ready: {service.not_ready_reason()}")


def replica_tag() -> str:
    return str(serve.get_replica_context().replica_tag)


class MMGPTReplica:
    """One replica: the mmgpt app with its engine, its metrics port and its health check."""

    def __init__(self, args: RayServeArgs) -> None:
        self.args = args
        self.service: Service | None = None
        self.metrics: MetricsEndpoint | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(Settings(**self.args.settings))
        self.service = app.state.service
        self.metrics = MetricsEndpoint(self.args)
        app.router.lifespan_context = self._ready_before_serving(app.router.lifespan_context)
        app.add_middleware(ReplicaIdentity, describe=self.describe)
        return app

    def _ready_before_serving(
        self, lifespan: Callable[[Any], AbstractAsyncContextManager[Any]]
    ) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
        """The app's lifespan, held until the model is loaded: Ray routes to a replica as
        soon as its startup ends, and a loading replica would only answer 503."""

        @asynccontextmanager
        async def lifespan_when_loaded(app: Any) -> AsyncIterator[Any]:
            async with lifespan(app) as state:
                assert self.service is not None and self.metrics is not None
                await wait_until_loaded(self.service, self.args.load_timeout_s)
                self.metrics.start()
                try:
                    yield state
                finally:
                    self.metrics.stop()

        return lifespan_when_loaded

    def describe(self) -> dict[str, Any]:
        port = self.metrics.port if self.metrics else None
        host = self.metrics.host if self.metrics else None
        return {
            "replica": replica_tag(),
            "pid": os.getpid(),
            "metrics_url": f"http://{host}:{port}/metrics" if port else None,
        }

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising gets the replica replaced."""
        if self.service is None or not self.service.is_ready:
            reason = self.service.not_ready_reason() if self.service else "no app yet"
            raise RuntimeError(f"mmgpt replica unhealthy: {reason}")


# The Serve deployment: the app comes from `__serve_build_asgi_app__` in each replica.
# serve.yaml's `deployments:` entry (name: mmgpt) overrides any of these options.
mmgpt_deployment = serve.deployment(
    name="mmgpt",
    num_replicas=1,
    ray_actor_options={"num_cpus": 1},
    # A continuous-batching engine wants many requests at once; the engine's own queue
    # limit (max_waiting_requests) answers 503 beyond what it can hold.
    max_ongoing_requests=128,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)(serve.ingress()(MMGPTReplica))


def build_app(args: RayServeArgs) -> Application:
    """The application builder that `serve run` and serve.yaml name (app.ray_serve:build_app)."""
    Settings(**args.settings)  # a misspelt or invalid setting fails here, not in each replica
    return mmgpt_deployment.bind(args)
