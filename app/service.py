"""The running service: the engine and what the routes need beside it, and its life cycle.

Loading happens in the background so that `/health` answers at once and `/ready`
says 503 until the model is loaded and the engine loop runs. On shutdown the
service first drains (no new requests, in-flight ones finish), then stops the
engine.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from app import metrics
from app.config import Settings
from app.engine.async_engine import AsyncEngine
from app.errors import APIError, not_ready
from app.media import ImageIntake, ImageLimits
from app.prompts import PromptBuilder
from app.remote_media import RemoteImageFetcher

if TYPE_CHECKING:
    from models.base import LoadedModel, ModelInfo

logger = logging.getLogger("mmgpt.service")


class Status(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Runtime:
    """What a route needs to serve one request, available once the model is loaded."""

    engine: AsyncEngine
    info: ModelInfo
    prompts: PromptBuilder
    images: ImageIntake | None  # None for text-only models
    fetcher: RemoteImageFetcher
    generation_defaults: dict[str, Any]
    settings: Settings
    model_id: str
    max_model_len: int  # the engine's: the checkpoint's, or less if configured


class Service:
    """Owns the engine for the life of the process; shared by every request."""

    def __init__(self, settings: Settings, loaded: LoadedModel | None = None) -> None:
        self.settings = settings
        self.model_id = settings.model_id()
        self.created = int(time.time())
        self.status = Status.LOADING
        self.failure: str | None = None
        self.in_flight = 0  # /v1 requests between arrival and their last byte
        self._loaded = loaded
        self._runtime: Runtime | None = None

    async def start(self) -> None:
        """Loads the model and starts the engine loop (the slow part runs in a thread)."""
        try:
            recorder = metrics.EngineStatsRecorder()
            build = functools.partial(
                AsyncEngine, self.settings.engine_config(), self._loaded, recorder.record
            )
            engine = await anyio.to_thread.run_sync(build)
            engine.start()
        except Exception as error:
            logger.exception("Loading the model failed")
            self.status, self.failure = Status.FAILED, f"{type(error).__name__}: {error}"
            return
        self._runtime = self._build_runtime(engine)
        metrics.record_model_info(engine.info, self.settings, engine.max_model_len)
        if self.status is Status.LOADING:
            self.status = Status.READY
        logger.info("Serving %s (%s)", self.model_id, engine.info.architecture)

    async def stop(self) -> None:
        """Stops the engine; requests still running are aborted."""
        self.status = Status.STOPPED
        if self._runtime is not None:
            await anyio.to_thread.run_sync(self._runtime.engine.stop, 0.0)

    def begin_drain(self) -> None:
        """No new requests from now on; /ready answers 503."""
        if self.status in (Status.LOADING, Status.READY):
            self.status = Status.DRAINING

    @property
    def engine(self) -> AsyncEngine | None:
        return self._runtime.engine if self._runtime else None

    @property
    def is_ready(self) -> bool:
        engine = self.engine
        return (
            self.status is Status.READY
            and engine is not None
            and engine.is_running
            and engine.is_healthy
        )

    def runtime(self) -> Runtime:
        """The runtime for a new request, or a 503 that says why there is none."""
        if self.status is Status.DRAINING or self.status is Status.STOPPED:
            raise draining()
        if self._runtime is None or not self.is_ready:
            raise not_ready(self.not_ready_reason())
        return self._runtime

    def not_ready_reason(self) -> str:
        if self.status is Status.FAILED:
            return f"The model failed to load: {self.failure}"
        if self.status is Status.LOADING:
            return "The model is loading; retry shortly."
        if self.status in (Status.DRAINING, Status.STOPPED):
            return "The server is shutting down."
        engine = self.engine
        if engine is not None and engine.is_running and not engine.is_healthy:
            return (
                f"The engine loop has made no progress for over {engine.stuck_after_s:g} s; "
                "it may be stuck."
            )
        return "The engine loop is not running."

    def _build_runtime(self, engine: AsyncEngine) -> Runtime:
        loaded, settings = engine.loaded, self.settings
        limits = ImageLimits(
            settings.max_image_bytes,
            settings.max_image_pixels,
            settings.max_image_tokens_per_request,
        )
        images = None
        if loaded.image_processor is not None:
            images = ImageIntake(loaded.image_processor, limits, engine.info.image_seq_length)
        fetcher = RemoteImageFetcher(
            settings.allowed_media_domains, limits, settings.media_fetch_timeout
        )
        return Runtime(
            engine=engine,
            info=engine.info,
            prompts=PromptBuilder(
                engine.tokenizer, engine.info, loaded.chat_template, settings.caption_prompt
            ),
            images=images,
            fetcher=fetcher,
            generation_defaults=dict(loaded.generation_defaults or {}),
            settings=settings,
            model_id=self.model_id,
            max_model_len=engine.max_model_len,
        )


def draining() -> APIError:
    return not_ready("The server is shutting down; retry on another instance.", "shutting_down")
