"""The synchronous engine: requests in, one step at a time, outputs out.

Single-threaded by design: `AsyncEngine` drives it from its loop thread, and
offline benchmarks drive it directly. A step is schedule, run, update.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from app import metrics
from app.engine.block_manager import BlockManager
from app.engine.config import EngineConfig
from app.engine.detokenizer import Detokenizer, SequenceText
from app.engine.kv_cache import max_model_len, num_kv_blocks
from app.engine.model_runner import ModelRunner, StepResult
from app.engine.request import Request, record_finished
from app.engine.sampling import RowLogprobs
from app.engine.scheduler import ScheduledBatch, Scheduler
from app.engine.sequence import (
    ImageSpan,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    Sequence,
    TokenLogprob,
)
from app.engine.structured import StructuredOutputs, consume
from app.engine.warm_up import warm_up
from models.base import LoadedModel

logger = logging.getLogger(__name__)

Delivery = tuple[Any, RequestOutput]  # (the request's sink, one output)
NONFINITE_ERROR = "the model produced no finite logits for this sequence"
GRAMMAR_ERROR = "the sampled token does not fit the JSON schema the request holds it to"


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.info = loaded.info
        self.max_model_len = max_model_len(config, loaded.info)
        num_blocks = num_kv_blocks(config, loaded.info)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.runner = ModelRunner(loaded, config, num_blocks)
        self.detokenizer = Detokenizer(loaded.tokenizer)
        self.structured = StructuredOutputs(
            loaded.tokenizer, loaded.info.vocab_size, loaded.info.eos_token_ids
        )
        self.requests: dict[str, Request] = {}
        self.num_steps = 0
        self.last_step_end = 0.0
        self._seq_ids = itertools.count()
        self._reported = _Counters()

    def warm_up(self) -> int:
        """One full-size made-up step before any request; the number of tokens it ran."""
        config = self.config
        return warm_up(
            self.runner, config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len
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
    ) -> Request:
        """Queue a validated request (AsyncEngine.submit validates)."""
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs = [
            Sequence(next(self._seq_ids), request_id, i, prompt_token_ids, params, image_spans)
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
        return self._end_request(request, "abort", None)

    def abort_all(self) -> list[Delivery]:
        deliveries: list[Delivery] = []
        for request in list(self.requests.values()):
            deliveries += self._end_request(request, "abort", None)
        return deliveries

    def _end_request(self, request: Request, reason: str, error: str | None) -> list[Delivery]:
        """Finish every unfinished sample of the request now, with an empty last output."""
        now = time.monotonic()
        deliveries = []
        for seq in request.unfinished_seqs():
            self.scheduler.finish(seq, reason)
            output = self._output(request, seq, [], "", reason)
            output.error = error
            deliveries.append((request.sink, self._count_finished(request, output, now)))
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
        self._record_step(batch, deliveries, started)
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
                timeline = self.requests[seq.request_id].metrics
                if timeline.first_scheduled_time is None:
                    timeline.first_scheduled_time = now

    # ---- outputs ----------------------------------------------------------------------
    def _on_token(self, seq: Sequence, result: StepResult, now: float) -> Delivery:
        request = self.requests[seq.request_id]
        token_id = seq.token_ids[-1]
        text = request.texts[seq.index]
        reason = seq.stop_reason_for(token_id, self.info.eos_token_ids)
        error = NONFINITE_ERROR if seq.seq_id in result.nonfinite_seq_ids else None
        grammar = consume(seq.matcher, token_id) if seq.matcher is not None else None
        if error is None and grammar == "error":
            error = GRAMMAR_ERROR
        if error is not None:
            reason = "error"
        elif reason != "stop" and (text.append(token_id) or grammar == "stop"):
            reason = "stop"  # a stop string, or the end of the grammar (stop tokens add no text)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            text.finish()
        request.mark_token(now)
        output = self._output(request, seq, [token_id], text.take_delta(reason is not None), reason)
        output.error = error
        row_logprobs = result.logprobs.get(seq.seq_id)
        if row_logprobs is not None:
            output.logprobs = [self._token_logprob(token_id, row_logprobs)]
        if seq.num_output_tokens == 1 and seq.params.prompt_logprobs is not None:
            output.prompt_logprobs = seq.prompt_logprobs
        if reason is not None:
            output = self._count_finished(request, output, now)
        return request.sink, output

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
            record_finished(request, now)
            del self.requests[request.request_id]
        output.metrics = request.metrics
        return output

    # ---- metrics ----------------------------------------------------------------------
    def _record_step(
        self, batch: ScheduledBatch, deliveries: list[Delivery], started: float
    ) -> None:
        now = time.monotonic()
        self.num_steps += 1
        self.last_step_end = now
        metrics.ENGINE_STEP_TIME.observe(now - started)
        metrics.BATCH_TOKENS.observe(batch.num_batched_tokens)
        metrics.GENERATION_TOKENS.inc(sum(len(output.token_ids) for _, output in deliveries))
        self._reported.publish(self)


class _Counters:
    """The cumulative engine counters already pushed to Prometheus, to push only the growth."""

    def __init__(self) -> None:
        self.values = {"queries": 0, "hits": 0, "image_queries": 0, "image_hits": 0, "preempt": 0}

    def publish(self, core: EngineCore) -> None:
        current = _counter_values(core)
        for name, counter in _COUNTERS.items():
            growth = current[name] - self.values[name]
            if growth:
                counter.inc(growth)
        self.values = current
        running = core.scheduler.running
        metrics.NUM_REQUESTS_RUNNING.set(len(running))
        metrics.NUM_REQUESTS_WAITING.set(len(core.scheduler.waiting))
        metrics.KV_CACHE_USAGE.set(core.block_manager.usage)
        mirror = core.runner.decode_mirror
        metrics.DECODE_MIRROR_BYTES.set(0 if mirror is None else mirror.nbytes)


def _counter_values(core: EngineCore) -> dict[str, int]:
    manager, images = core.block_manager, core.runner.image_cache
    return {
        "queries": manager.prefix_cache_queries,
        "hits": manager.prefix_cache_hits,
        "image_queries": images.queries,
        "image_hits": images.hits,
        "preempt": core.scheduler.num_preemptions,
    }


_COUNTERS = {
    "queries": metrics.PREFIX_CACHE_QUERIES,
    "hits": metrics.PREFIX_CACHE_HITS,
    "image_queries": metrics.IMAGE_CACHE_QUERIES,
    "image_hits": metrics.IMAGE_CACHE_HITS,
    "preempt": metrics.NUM_PREEMPTIONS,
}
