"""A request's timeline: token gaps as tokens come, and its spans once it ends."""

from __future__ import annotations

from app.engine.request import Request
from app.engine.sequence import RequestMetrics, SamplingParams, Sequence


def request_of(num_samples: int, arrival: float) -> Request:
    params = SamplingParams(n=num_samples)
    seqs = [Sequence(i, "r", i, [1, 2, 3], params) for i in range(num_samples)]
    return Request("r", seqs, [], RequestMetrics(arrival))


def test_a_finished_request_reports_each_span_of_its_timeline() -> None:
    request = request_of(2, arrival=10.0)
    request.timeline.first_scheduled_time = 10.5
    for now, seq in ((11.0, 0), (11.0, 1), (11.25, 0), (12.0, 1)):
        request.seqs[seq].append_token(7)
        request.mark_token(now)
    stats = request.finish(12.5)
    assert request.timeline.finished_time == 12.5
    assert (stats.num_prompt_tokens, stats.num_generation_tokens) == (3, 4)
    assert (stats.e2e_latency, stats.queue_time, stats.time_to_first_token) == (2.5, 0.5, 1.0)
    assert (stats.prefill_time, stats.decode_time) == (0.5, 1.0)
    assert stats.token_gaps == (0.25, 0.75)  # two samples' tokens at one instant: no gap


def test_a_request_that_never_ran_has_no_spans_but_its_wait() -> None:
    unscheduled = request_of(1, arrival=4.0).finish(6.0)
    assert unscheduled.e2e_latency == 2.0
    assert unscheduled.queue_time is None and unscheduled.time_to_first_token is None
    assert unscheduled.prefill_time is None and unscheduled.decode_time is None
    scheduled = request_of(1, arrival=4.0)
    scheduled.timeline.first_scheduled_time = 5.0
    no_token = scheduled.finish(6.0)
    assert no_token.queue_time == 1.0 and no_token.time_to_first_token is None
    assert no_token.num_generation_tokens == 0 and no_token.token_gaps == ()
