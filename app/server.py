"""Running the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

uvicorn on its own stops listening at the first signal, so a load balancer sees
refused connections and requests in flight may be cut. Here the first signal
only starts a drain: the port stays open, /ready and new /v1 requests answer
503, in-flight requests finish (up to `drain_timeout`; those still running then
are aborted and answered 503), and only then does uvicorn shut down and the
engine stop. A second signal exits at once. A model that fails to load ends
the process with status 1.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.config import Settings
from app.service import Service, Status

logger = logging.getLogger("mmgpt.server")
# After the drain, connections get this long to finish writing before being cut.
FINAL_GRACE_S = 2.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self.drain_deadline: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is not None or not self.started:
            self.should_exit = True
            self.force_exit = self.drain_deadline is not None
            return
        logger.info(
            "Received %s: draining for up to %.0f s", signal.Signals(sig).name, self._timeout
        )
        self.service.begin_drain()
        self.drain_deadline = time.monotonic() + self._timeout

    async def on_tick(self, counter: int) -> bool:
        if self.service.status is Status.FAILED:
            logger.error("Exiting: %s", self.service.not_ready_reason())
            self.exit_code, self.should_exit = 1, True
        elif self.drain_deadline is not None and await self._drained():
            self.should_exit = True
        return await super().on_tick(counter)

    @property
    def _timeout(self) -> float:
        return self.service.settings.drain_timeout

    async def _drained(self) -> bool:
        assert self.drain_deadline is not None
        if self.service.in_flight == 0:
            return True
        if time.monotonic() >= self.drain_deadline:
            logger.warning("Drain timeout: %d requests still running", self.service.in_flight)
            # Abort them in the engine now, so that each gets its 503 envelope (or error event)
            # within the final grace, rather than being cancelled by uvicorn mid-response.
            await self.service.stop()
            return True
        return False


def serve(app: FastAPI, settings: Settings) -> int:
    """Serves until a signal (and the drain after it); returns the process exit status."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(FINAL_GRACE_S),
        lifespan="on",
    )
    server = DrainingServer(config, app.state.service)
    server.run()
    return server.exit_code
