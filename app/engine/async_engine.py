"""AsyncEngine: the engine behind an asyncio front end.

One loop thread owns all engine state and makes every torch call. The
asyncio side only enqueues (a thread-safe inbox) and consumes: each request
has an asyncio.Queue, fed once per step, per event loop, through
`loop.call_soon_threadsafe`; a fast stream's outputs are joined and sent at most
once per `stream_interval_ms` (app/engine/pacing.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.config import EngineConfig
from app.engine.engine_core import EngineCore
from app.engine.errors import (
    AdapterNotFoundError,
    EngineNotRunningError,
    EngineOverloadedError,
    InvalidRequestError,
)
from app.engine.pacing import StreamPacer
from app.engine.request import Delivery
from app.engine.sequence import ImageInput, ImageSpan, RequestOutput, SamplingParams
from app.engine.stats import EngineStats, StatsSink, StatsUpdate, ignore_stats
from app.engine.step_threads import in_passing_thread
from app.engine.structured import StructuredOutputs
from app.engine.validation import (
    image_spans,
    validate_image_tokens,
    validate_length,
    validate_params,
    validate_prompt,
)
from models.base import LoadedModel, ModelInfo

logger = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 0.5  # an idle loop wakes this often to show it is alive
STUCK_AFTER_SECONDS = 120.0  # no heartbeat for this long (one step running on) means unhealthy


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    spans: tuple[ImageSpan, ...]
    stream: RequestStream
    arrival_time: float
    adapter_name: str | None = None


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _AdapterChange:
    """Load (`path` given) or unload a LoRA adapter on the loop thread, between steps."""

    name: str
    path: str | None
    done: concurrent.futures.Future[None]


_WAKE = object()


class RequestStream:
    """The outputs of one request, in order; for n > 1 the samples interleave by `.index`."""

    def __init__(self, request_id: str, num_samples: int, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._unread = set(range(num_samples))  # samples whose last output is not yet read
        self._undelivered = num_samples  # samples whose last output is not yet queued
        self._closed = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unread or self._closed:
            raise StopAsyncIteration
        output = await self._queue.get()
        if output.finished:
            self._unread.discard(output.index)
        return output

    async def aclose(self) -> None:
        """Stop reading; aborts the request if it has not finished."""
        if not self.is_complete and not self._closed:
            self._engine.abort(self.request_id)
        self._closed = True

    @property
    def is_complete(self) -> bool:
        """Every sample's last output is queued: the engine is done with this request."""
        return self._undelivered == 0

    def put(self, output: RequestOutput) -> None:
        """On the event loop: queue one output from the engine."""
        self._queue.put_nowait(output)
        if output.finished:
            self._undelivered -= 1


class AsyncEngine:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        on_stats: StatsSink = ignore_stats,
    ) -> None:
        """`on_stats` receives the engine's stats on its loop thread, inside the step."""
        self.config = config
        self._on_stats = on_stats
        # Loading, the KV cache allocation and the warm-up step run parallel ops: on a thread
        # that then ends (the pages they touch stay with the process).
        self._loaded, self._core = in_passing_thread(
            lambda: _build(config, loaded, self._take_stats)
        )
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pacer = StreamPacer(config.stream_interval_ms / 1000)  # the loop thread's
        self._live: dict[str, RequestStream] = {}  # touched on the event loop only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain_deadline = 0.0
        self._heartbeat = time.monotonic()
        self.stuck_after_s = STUCK_AFTER_SECONDS
        self._stats = self._core.snapshot()
        self._adapter_names = set(self._core.adapters.names)  # read and written on the event loop

    # ---- what the API reads ------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return self._loaded.info

    @property
    def tokenizer(self) -> Any:
        return self._loaded.tokenizer

    @property
    def loaded(self) -> LoadedModel:
        return self._loaded

    @property
    def max_model_len(self) -> int:
        return self._core.max_model_len

    @property
    def structured(self) -> StructuredOutputs:
        """Compiles response_format schemas; thread-safe, so callable off the event loop."""
        return self._core.structured

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def is_healthy(self) -> bool:
        return self.is_running and time.monotonic() - self._heartbeat < self.stuck_after_s

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters requests may name, by name."""
        return sorted(self._adapter_names)

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run_loop, name="mmgpt-engine", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for up to drain_timeout, abort the rest."""
        thread = self._thread
        if thread is None:
            return
        self._drain_deadline = time.monotonic() + max(0.0, drain_timeout)
        self._stopping = True
        self._inbox.put(_WAKE)
        thread.join()

    # ---- requests ----------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        images: Sequence[ImageInput] = (),
        adapter_name: str | None = None,
    ) -> RequestStream:
        """Validate and queue a request; call on the event loop thread. `adapter_name`
        names a LoRA adapter, None the base model."""
        if not self.is_running:
            raise EngineNotRunningError("the engine is not running")
        if request_id in self._live:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        if adapter_name is not None and adapter_name not in self._adapter_names:
            raise AdapterNotFoundError(f"The model {adapter_name!r} does not exist.")
        spans = self._validate(prompt_token_ids, params, images)
        if self._is_full():
            raise EngineOverloadedError(
                f"{self.config.max_waiting_requests} requests are already waiting; retry later"
            )
        stream = RequestStream(request_id, params.n, self)
        self._live[request_id] = stream
        arrival = time.monotonic()
        prompt = list(prompt_token_ids)
        self._inbox.put(_Add(request_id, prompt, params, spans, stream, arrival, adapter_name))
        return stream

    def _is_full(self) -> bool:
        """The waiting queue is full: by the inbox and the loop's last count of waiting
        requests, or by the requests not yet finished, counted here with no race against the
        loop thread (whose count lags while it moves the inbox into its queue)."""
        config = self.config
        waiting = self._inbox.qsize() + self._stats.num_waiting
        unfinished = len(self._live)
        return (
            waiting >= config.max_waiting_requests
            or unfinished >= config.max_num_seqs + config.max_waiting_requests
        )

    def _validate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        images: Sequence[ImageInput],
    ) -> tuple[ImageSpan, ...]:
        validate_params(params, self.info, self.config.max_logprobs)
        validate_prompt(prompt_token_ids, self.info)
        validate_length(
            len(prompt_token_ids), params.max_tokens, self.max_model_len, self._core.capacity_tokens
        )
        spans = image_spans(prompt_token_ids, images, self.info)
        validate_image_tokens(spans, self.config.max_image_tokens_per_request)
        return spans

    def abort(self, request_id: str) -> None:
        """Abort a request (safe at any time); its blocks are freed at the next step."""
        self._inbox.put(_Abort(request_id))

    # ---- LoRA adapters -----------------------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT folder as adapter `name`, between two steps (AdapterLoadError)."""
        await self._change_adapter(name, path)
        self._adapter_names.add(name)

    async def unload_adapter(self, name: str) -> None:
        """New requests may no longer name it; those in flight finish with it first."""
        if name not in self._adapter_names:
            raise AdapterNotFoundError(f"no LoRA adapter named {name!r} is loaded")
        self._adapter_names.discard(name)
        await self._change_adapter(name, None)

    async def _change_adapter(self, name: str, path: str | None) -> None:
        if not self.is_running:
            raise EngineNotRunningError("the engine is not running")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._inbox.put(_AdapterChange(name, path, done))
        await asyncio.wrap_future(done)

    # ---- the loop thread ---------------------------------------------------------------
    def _run_loop(self) -> None:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        reason = "abort"
        try:
            while not self._should_exit():
                self._heartbeat = time.monotonic()
                self._take_inbox(block=not self._core.has_unfinished)
                started = time.monotonic()
                deliveries = self._core.step() if self._core.has_unfinished else []
                now = time.monotonic()
                self._deliver(self._pacer.pace(deliveries, now, next_step_s=now - started))
        except Exception:
            logger.exception("the engine loop died")
            reason = "error"
        finally:
            self._stopping = True
            self._end_all(reason)

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_SECONDS) if block else self._inbox.get_nowait()
            while True:
                self._handle(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, item: Any) -> None:
        if isinstance(item, _Add):
            self._add(item)
        elif isinstance(item, _Abort):
            self._deliver_now(self._core.abort_request(item.request_id))
        elif isinstance(item, _AdapterChange):
            self._change(item)

    def _change(self, item: _AdapterChange) -> None:
        try:
            if item.path is None:
                self._core.unload_adapter(item.name)
            else:
                self._core.load_adapter(item.name, item.path)
        except Exception as exc:  # reported to the caller, never taking the loop down
            item.done.set_exception(exc)
        else:
            item.done.set_result(None)

    def _add(self, item: _Add) -> None:
        try:
            self._core.add_request(
                item.request_id,
                item.prompt_token_ids,
                item.params,
                item.spans,
                sink=item.stream,
                arrival_time=item.arrival_time,
                adapter_name=item.adapter_name,
            )
        except Exception as exc:  # a bug must not take the loop down: fail this request only
            logger.exception("could not add request %s", item.request_id)
            error = f"{type(exc).__name__}: {exc}"
            outputs = [
                RequestOutput(item.request_id, i, "", [], "error", error=error)
                for i in range(item.params.n)
            ]
            self._deliver_now([Delivery(item.stream, output) for output in outputs])

    def _should_exit(self) -> bool:
        if not self._stopping:
            return False
        if self._core.has_unfinished and time.monotonic() < self._drain_deadline:
            return False
        return self._inbox.empty() or time.monotonic() >= self._drain_deadline

    def _end_all(self, reason: str) -> None:
        """Abort whatever is left (queued or running) so that no stream waits forever."""
        self._take_inbox(block=False)
        deliveries = self._core.abort_all()
        if reason == "error":
            for delivery in deliveries:
                output = delivery.output
                output.finish_reason, output.error = "error", "the engine loop died"
        self._deliver_now(deliveries)

    def _take_stats(self, update: StatsUpdate) -> None:
        """On the loop thread, inside the step: before delivery, so a caller sees both agree."""
        self._stats = update.engine
        self._on_stats(update)

    def _deliver_now(self, deliveries: list[Delivery]) -> None:
        """Outputs made between steps (aborts, refusals) go now, and all that is held
        with them (a stream's held outputs joined ahead of its new one)."""
        self._deliver(self._pacer.pace(deliveries, time.monotonic(), next_step_s=float("inf")))

    def _deliver(self, deliveries: list[Delivery]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}
        for delivery in deliveries:
            by_loop.setdefault(delivery.sink.loop, []).append(delivery)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                continue

    def _put_all(self, deliveries: list[Delivery]) -> None:
        """On the streams' event loop: queue each output; forget the requests that are done."""
        for delivery in deliveries:
            stream: RequestStream = delivery.sink  # every request's sink is its stream
            stream.put(delivery.output)
            if stream.is_complete:
                self._live.pop(stream.request_id, None)


def _build(
    config: EngineConfig, loaded: LoadedModel | None, on_stats: StatsSink
) -> tuple[LoadedModel, EngineCore]:
    if config.num_threads:  # loading times the model's products: with the engine's threads
        torch.set_num_threads(config.num_threads)
    loaded = loaded if loaded is not None else _load(config)
    core = EngineCore(config, loaded, on_stats)
    if config.warm_up:
        core.warm_up()
    return loaded, core


def _load(config: EngineConfig) -> LoadedModel:
    from models import load_model

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(config.model, device, config.dtype, config.quantization)
