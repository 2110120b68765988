"""One request inside the engine: its samples, their text, its timeline and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from app import metrics
from app.engine.detokenizer import SequenceText
from app.engine.sequence import RequestMetrics, RequestOutput, Sequence


class Delivery(NamedTuple):
    """One output and where it goes: the sink its caller gave `add_request`, untouched."""

    sink: Any  # the caller's own type: AsyncEngine's streams, an offline driver's indices
    output: RequestOutput


@dataclass(eq=False)
class Request:
    request_id: str
    seqs: list[Sequence]  # the n samples, by index; seqs[0] is scheduled first
    texts: list[SequenceText]  # by sample index
    metrics: RequestMetrics
    sink: Any = None  # where the caller wants this request's outputs delivered
    token_gaps: list[float] = field(default_factory=list)  # seconds between output tokens
    num_finished: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return self.seqs[0].num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.num_finished == len(self.seqs)

    def unfinished_seqs(self) -> list[Sequence]:
        return [seq for seq in self.seqs if not seq.is_finished]

    def deliver(self, output: RequestOutput) -> Delivery:
        return Delivery(self.sink, output)

    def mark_token(self, now: float) -> None:
        """Record the time of an output token (of any sample) for latency metrics."""
        timeline = self.metrics
        if timeline.first_token_time is None:
            timeline.first_token_time = now
        elif timeline.last_token_time is not None and now > timeline.last_token_time:
            self.token_gaps.append(now - timeline.last_token_time)
        timeline.last_token_time = now


def record_finished(request: Request, now: float) -> None:
    """Observe the per-request histograms once the request's last sample has finished."""
    timeline = request.metrics
    timeline.finished_time = now
    num_generated = sum(seq.num_output_tokens for seq in request.seqs)
    metrics.PROMPT_TOKENS.inc(request.num_prompt_tokens)
    metrics.REQUEST_PROMPT_TOKENS.observe(request.num_prompt_tokens)
    metrics.REQUEST_GENERATION_TOKENS.observe(num_generated)
    metrics.E2E_REQUEST_LATENCY.observe(now - timeline.arrival_time)
    if timeline.first_scheduled_time is not None:
        metrics.REQUEST_QUEUE_TIME.observe(timeline.first_scheduled_time - timeline.arrival_time)
    if timeline.first_token_time is None:
        return
    metrics.TIME_TO_FIRST_TOKEN.observe(timeline.first_token_time - timeline.arrival_time)
    if timeline.first_scheduled_time is not None:
        prefill = timeline.first_token_time - timeline.first_scheduled_time
        metrics.REQUEST_PREFILL_TIME.observe(prefill)
    if timeline.last_token_time is not None:
        metrics.REQUEST_DECODE_TIME.observe(timeline.last_token_time - timeline.first_token_time)
    for gap in request.token_gaps:
        metrics.INTER_TOKEN_LATENCY.observe(gap)
