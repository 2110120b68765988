"""How often a stream's outputs leave the engine: at most once per `interval`.

Every output that reaches the front end costs a thread wake-up, a trip through the
event loop, one Server-Sent Event and a socket write, and the client's read of it:
per token, as much CPU again as a small model's whole decode step. So the outputs a
stream makes within `interval` of its last send are held and go out joined, as one
output (one event), while a slower stream, whose tokens come further apart, sends each
one as it comes. A stream's first output and its last are never held, and no output
waits past its deadline for a step expected to end after it.
"""

from __future__ import annotations

import dataclasses

from app.engine.request import Delivery
from app.engine.sequence import RequestOutput

StreamKey = tuple[str, int]  # request id, sample index


class StreamPacer:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._held: dict[StreamKey, Delivery] = {}
        self._last_sent: dict[StreamKey, float] = {}  # streams that have sent and not ended

    def pace(self, deliveries: list[Delivery], now: float, next_step_s: float) -> list[Delivery]:
        """What to send now, at most one output per stream, earlier outputs joined in; the
        rest is held. `next_step_s`: how long the next step is expected to take."""
        if self.interval_s <= 0 and not self._held:
            return deliveries
        for delivery in deliveries:
            key = (delivery.output.request_id, delivery.output.index)
            earlier = self._held.get(key)
            self._held[key] = delivery if earlier is None else _joined(earlier, delivery)
        held = list(self._held.items())
        return [delivery for key, delivery in held if self._due(key, now, next_step_s)]

    @property
    def num_held(self) -> int:
        return len(self._held)

    def _due(self, key: StreamKey, now: float, next_step_s: float) -> bool:
        """The stream's held output goes now (and is no longer held)?"""
        output = self._held[key].output
        last = self._last_sent.get(key)
        if not output.finished and last is not None and now + next_step_s < last + self.interval_s:
            return False
        del self._held[key]
        if output.finished:
            self._last_sent.pop(key, None)
        else:
            self._last_sent[key] = now
        return True


def _joined(first: Delivery, then: Delivery) -> Delivery:
    """One delivery saying what both say, in order."""
    return Delivery(then.sink, joined_outputs(first.output, then.output))


def joined_outputs(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """`first` then `then`, of one sample, as one output: the new text and tokens of both,
    and what is cumulative or final (token count, finish, metrics) from the later."""
    logprobs = None
    if first.logprobs is not None or then.logprobs is not None:
        logprobs = [*(first.logprobs or ()), *(then.logprobs or ())]
    prompt_logprobs = first.prompt_logprobs  # a sample's first output has them, if any
    if prompt_logprobs is None:
        prompt_logprobs = then.prompt_logprobs
    return dataclasses.replace(
        then,
        text=first.text + then.text,
        token_ids=[*first.token_ids, *then.token_ids],
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        num_prompt_tokens=then.num_prompt_tokens or first.num_prompt_tokens,
        num_cached_tokens=then.num_cached_tokens or first.num_cached_tokens,
    )
