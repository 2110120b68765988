"""One request inside the engine: its samples, their text, where its outputs go, its timeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from app.engine.detokenizer import SequenceText
from app.engine.sequence import RequestMetrics, RequestOutput, Sequence
from app.engine.stats import FinishedRequestStats


class Delivery(NamedTuple):
    """One output and where it goes: the sink its caller gave `add_request`, untouched."""

    sink: Any  # the caller's own type: AsyncEngine's streams, an offline driver's indices
    output: RequestOutput


@dataclass(eq=False)
class Request:
    request_id: str
    seqs: list[Sequence]  # the n samples, by index; seqs[0] is scheduled first
    texts: list[SequenceText]  # by sample index
    timeline: RequestMetrics
    sink: Any = None  # where the caller wants this request's outputs
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
        """Record the time of an output token (of any sample) for latency stats."""
        timeline = self.timeline
        if timeline.first_token_time is None:
            timeline.first_token_time = now
        elif timeline.last_token_time is not None and now > timeline.last_token_time:
            self.token_gaps.append(now - timeline.last_token_time)
        timeline.last_token_time = now

    def finish(self, now: float) -> FinishedRequestStats:
        """Close the timeline once the last sample has ended; its spans, for the stats."""
        timeline = self.timeline
        timeline.finished_time = now
        arrival, scheduled = timeline.arrival_time, timeline.first_scheduled_time
        first, last = timeline.first_token_time, timeline.last_token_time
        return FinishedRequestStats(
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=sum(seq.num_output_tokens for seq in self.seqs),
            e2e_latency=now - arrival,
            queue_time=None if scheduled is None else scheduled - arrival,
            time_to_first_token=None if first is None else first - arrival,
            prefill_time=None if first is None or scheduled is None else first - scheduled,
            decode_time=None if first is None or last is None else last - first,
            token_gaps=tuple(self.token_gaps),
            num_image_tokens=sum(span.length for span in self.seqs[0].image_spans),
        )
