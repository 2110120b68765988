"""The synchronous engine: requests in, one step at a time, outputs out.

Single-threaded by design: `AsyncEngine` drives it from its loop thread, and
offline benchmarks drive it directly. A step is schedule, run, update; after each
step and each abort the engine hands its stats to the sink it was given.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from typing import Any

from app.engine.adapters import AdapterTable
from app.engine.block_manager import BlockManager
from app.engine.config import EngineConfig
from app.engine.detokenizer import Detokenizer, SequenceText
from app.engine.kv_cache import max_model_len, num_kv_blocks
from app.engine.model_runner import ModelRunner, StepResult
from app.engine.request import Delivery, Request
from app.engine.sampling import RowLogprobs
from app.engine.scheduler import ScheduledBatch, Scheduler
from app.engine.sequence import (
    AdapterRef,
    ImageInput,
    ImageSpan,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    Sequence,
    TokenLogprob,
)
from app.engine.stats import (
    EngineStats,
    FinishedRequestStats,
    StatsSink,
    StatsUpdate,
    StepStats,
    ignore_stats,
)
from app.engine.structured import StructuredOutputs, consume
from app.engine.warm_up import warm_up
from models import enable_lora
from models.base import AdapterSlots, LoadedModel

logger = logging.getLogger(__name__)

NONFINITE_ERROR = "the model produced no finite logits for this sequence"
GRAMMAR_ERROR = "the sampled token does not fit the JSON schema the request holds it to"


class EngineCore:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel, on_stats: StatsSink = ignore_stats
    ) -> None:
        self.config = config
        self.info = loaded.info
        self.max_model_len = max_model_len(config, loaded.info)
        num_blocks = num_kv_blocks(config, loaded.info)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            loaded.info.image_spans_in_one_chunk,
        )
        lora = _lora_slots(loaded, config)
        self.runner = ModelRunner(loaded, config, num_blocks, lora)
        self.adapters = AdapterTable(lora)
        for name, path in config.lora_modules:
            self.adapters.load(name, path)
        self.detokenizer = Detokenizer(loaded.tokenizer)
        self.structured = StructuredOutputs(
            loaded.tokenizer, loaded.info.vocab_size, loaded.info.eos_token_ids
        )
        self.requests: dict[str, Request] = {}
        self.num_steps = 0
        self.last_step_end = 0.0
        self._seq_ids = itertools.count()
        self._on_stats = on_stats
        self._finished: list[FinishedRequestStats] = []  # since the last stats update
        self._warm_up_image = _warm_up_image(loaded)

    def warm_up(self) -> int:
        """One full-size made-up step before any request; the number of tokens it ran."""
        config = self.config
        return warm_up(
            self.runner,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            self.max_model_len,
            self._warm_up_image,
        )

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def capacity_tokens(self) -> int:
        return self.block_manager.capacity_tokens

    # ---- requests ---------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        image_spans: tuple[ImageSpan, ...] = (),
        sink: Any = None,
        arrival_time: float | None = None,
        adapter_name: str | None = None,
    ) -> Request:
        """Queue a validated request (AsyncEngine.submit validates); `adapter_name` names a
        loaded LoRA adapter (AdapterNotFoundError if none is), None the base model."""
        arrival = time.monotonic() if arrival_time is None else arrival_time
        positions = self.runner.rope_positions(len(prompt_token_ids), image_spans)
        adapter = None if adapter_name is None else self.adapters.acquire(adapter_name)
        seqs = [
            Sequence(
                next(self._seq_ids),
                request_id,
                i,
                prompt_token_ids,
                params,
                image_spans,
                positions,
                adapter,
            )
            for i in range(params.n)
        ]
        seqs[0].pending_forks = seqs[1:]
        if params.grammar is not None:
            for seq in seqs:
                seq.matcher = self.structured.matcher(params.grammar)
        texts = [
            SequenceText(
                self.detokenizer.new_stream(prompt_token_ids, params.skip_special_tokens), params
            )
            for _ in seqs
        ]
        request = Request(request_id, seqs, texts, RequestMetrics(arrival), sink)
        self.requests[request_id] = request
        self.scheduler.add(seqs[0])
        return request

    def abort_request(self, request_id: str) -> list[Delivery]:
        request = self.requests.get(request_id)
        if request is None:
            return []
        deliveries = self._end_request(request, "abort", None)
        self._emit_stats(step=None)
        return deliveries

    def abort_all(self) -> list[Delivery]:
        if not self.requests:
            return []
        deliveries: list[Delivery] = []
        for request in list(self.requests.values()):
            deliveries += self._end_request(request, "abort", None)
        self._emit_stats(step=None)
        return deliveries

    def _end_request(self, request: Request, reason: str, error: str | None) -> list[Delivery]:
        """Finish every unfinished sample of the request now, with an empty last output."""
        now = time.monotonic()
        deliveries = []
        for seq in request.unfinished_seqs():
            self.scheduler.finish(seq, reason)
            output = self._output(request, seq, [], "", reason)
            output.error = error
            deliveries.append(request.deliver(self._count_finished(request, output, now)))
        return deliveries

    # ---- the step ---------------------------------------------------------------------
    def step(self) -> list[Delivery]:
        """Schedule, run, update. A failing step fails only its own requests."""
        started = time.monotonic()
        batch = self.scheduler.schedule()
        deliveries: list[Delivery] = []  # kept if the update fails part-way: some may be final
        try:
            self._update(batch, self._run(batch, started), deliveries)
        except Exception as exc:  # a model error or a bug ends this step's requests only
            logger.exception("engine step failed; failing its %d sequences", len(batch.seqs))
            deliveries += self._fail(batch, exc)
        self._end_step(batch, deliveries, started)
        return deliveries

    def _run(self, batch: ScheduledBatch, started: float) -> StepResult:
        if batch.is_empty:
            return StepResult([])
        self._mark_scheduled(batch, started)
        return self.runner.run(batch)

    def _update(
        self, batch: ScheduledBatch, result: StepResult, deliveries: list[Delivery]
    ) -> None:
        if result.prompt_logprobs:
            self._add_prompt_logprobs(batch, result)  # before the update forks samples off
        with_token = self.scheduler.update(batch, result.sampled)
        now = time.monotonic()
        for seq in with_token:
            deliveries.append(self._on_token(seq, result, now))

    def _add_prompt_logprobs(self, batch: ScheduledBatch, result: StepResult) -> None:
        for seq in batch.seqs:
            for token_id, row in result.prompt_logprobs.get(seq.seq_id, ()):
                seq.prompt_logprobs.append(self._token_logprob(token_id, row))

    def _fail(self, batch: ScheduledBatch, exc: Exception) -> list[Delivery]:
        error = f"{type(exc).__name__}: {exc}"
        deliveries: list[Delivery] = []
        for request_id in dict.fromkeys(seq.request_id for seq in batch.seqs):
            request = self.requests.get(request_id)
            if request is not None:
                deliveries += self._end_request(request, "error", error)
        return deliveries

    def _mark_scheduled(self, batch: ScheduledBatch, now: float) -> None:
        for seq in batch.seqs:
            if seq.num_output_tokens == 0:
                timeline = self.requests[seq.request_id].timeline
                if timeline.first_scheduled_time is None:
                    timeline.first_scheduled_time = now

    # ---- outputs ----------------------------------------------------------------------
    def _on_token(self, seq: Sequence, result: StepResult, now: float) -> Delivery:
        request = self.requests[seq.request_id]
        token_id = seq.token_ids[-1]
        reason, error = self._finish_reason(seq, token_id, request.texts[seq.index], result)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            request.texts[seq.index].finish()
        request.mark_token(now)
        output = self._token_output(request, seq, token_id, reason, result)
        output.error = error
        if reason is not None:
            output = self._count_finished(request, output, now)
        return request.deliver(output)

    def _finish_reason(
        self, seq: Sequence, token_id: int, text: SequenceText, result: StepResult
    ) -> tuple[str | None, str | None]:
        """Why the sample ends at this token, if it does, and the error when it fails.
        The grammar and the text both take the token here (stop tokens add no text)."""
        reason = seq.stop_reason_for(token_id, self.info.eos_token_ids)
        grammar = consume(seq.matcher, token_id) if seq.matcher is not None else None
        if seq.seq_id in result.nonfinite_seq_ids:
            return "error", NONFINITE_ERROR
        if grammar == "error":
            return "error", GRAMMAR_ERROR
        if reason == "stop":
            return reason, None
        hit_stop_string = text.append(token_id)
        if hit_stop_string or grammar == "stop":  # a stop string, or the grammar's end
            return "stop", None
        return reason, None

    def _token_output(
        self,
        request: Request,
        seq: Sequence,
        token_id: int,
        reason: str | None,
        result: StepResult,
    ) -> RequestOutput:
        delta = request.texts[seq.index].take_delta(reason is not None)
        output = self._output(request, seq, [token_id], delta, reason)
        row_logprobs = result.logprobs.get(seq.seq_id)
        if row_logprobs is not None:
            output.logprobs = [self._token_logprob(token_id, row_logprobs)]
        if seq.num_output_tokens == 1 and seq.params.prompt_logprobs is not None:
            output.prompt_logprobs = seq.prompt_logprobs
        return output

    def _output(
        self,
        request: Request,
        seq: Sequence,
        token_ids: list[int],
        delta: str,
        reason: str | None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            index=seq.index,
            text=delta,
            token_ids=token_ids,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_generated_tokens=seq.num_output_tokens,
        )  # fmt: skip

    def _token_logprob(self, token_id: int, row: RowLogprobs) -> TokenLogprob:
        text_of = self.detokenizer.token_text
        top: dict[str, float] = {}
        for top_id, logprob in zip(row.top_token_ids, row.top_logprobs, strict=True):
            top.setdefault(text_of(top_id), logprob)  # tokens with equal text: keep the likeliest
        return TokenLogprob(token_id, text_of(token_id), row.token_logprob, top)

    def _count_finished(self, request: Request, output: RequestOutput, now: float) -> RequestOutput:
        request.num_finished += 1
        if request.is_finished:
            self._finished.append(request.finish(now))
            del self.requests[request.request_id]
            if request.seqs[0].adapter is not None:
                self.adapters.release(request.seqs[0].adapter)
        output.metrics = request.timeline
        return output

    # ---- stats ------------------------------------------------------------------------
    def _end_step(self, batch: ScheduledBatch, deliveries: list[Delivery], started: float) -> None:
        now = time.monotonic()
        self.num_steps += 1
        self.last_step_end = now
        num_generated = sum(len(delivery.output.token_ids) for delivery in deliveries)
        vision_seconds = self.runner.step_vision_seconds
        step = StepStats(now - started, batch.num_batched_tokens, num_generated, vision_seconds)
        self._emit_stats(step)

    def _emit_stats(self, step: StepStats | None) -> None:
        finished, self._finished = tuple(self._finished), []
        self._on_stats(StatsUpdate(self.snapshot(), step, finished))

    def snapshot(self) -> EngineStats:
        """The engine's state now; the one place that reads its counters."""
        scheduler, manager = self.scheduler, self.block_manager
        images, mirror = self.runner.image_cache, self.runner.decode_mirror
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=manager.usage,
            num_blocks=manager.num_blocks,
            num_free_blocks=manager.num_free_blocks,
            decode_mirror_bytes=0 if mirror is None else mirror.nbytes,
            prefix_cache_queries=manager.prefix_cache_queries,
            prefix_cache_hits=manager.prefix_cache_hits,
            image_cache_queries=images.queries,
            image_cache_hits=images.hits,
            num_preemptions=scheduler.num_preemptions,
            num_steps=self.num_steps,
            last_step_end=self.last_step_end,
            adapter_requests=self._adapter_requests(),
        )

    def _adapter_requests(self) -> tuple[tuple[str, int, int], ...]:
        """(name, running, waiting) sequences of every adapter that holds a slot."""
        serving = self.adapters.serving()
        if not serving:
            return ()
        running = _count_by_adapter(self.scheduler.running)
        waiting = _count_by_adapter(self.scheduler.waiting)
        return tuple(
            (ref.name, running.get(ref.load_id, 0), waiting.get(ref.load_id, 0)) for ref in serving
        )

    # ---- adapters ---------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> AdapterRef:
        """Load a PEFT folder under `name` (AdapterLoadError if it does not fit)."""
        ref = self.adapters.load(name, path)
        self._emit_stats(step=None)
        return ref

    def unload_adapter(self, name: str) -> None:
        """Forget `name` now; its requests in flight finish with it first."""
        self.adapters.unload(name)
        self._emit_stats(step=None)


def _warm_up_image(loaded: LoadedModel) -> ImageInput | None:
    """A native-resolution model's warm-up image, made by its own processor."""
    features = loaded.warm_up_image()
    if features is None:
        return None
    return ImageInput(features.pixel_values, "warm-up", features.num_tokens, features.extra)


def _lora_slots(loaded: LoadedModel, config: EngineConfig) -> AdapterSlots | None:
    if not config.enable_lora:
        return None
    return enable_lora(loaded.model, config.max_loras, config.max_lora_rank)


def _count_by_adapter(seqs: Iterable[Sequence]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for seq in seqs:
        if seq.adapter is not None:
            counts[seq.adapter.load_id] = counts.get(seq.adapter.load_id, 0) + 1
    return counts
