"""Overload: a burst of ten times what the server holds.

The server runs two sequences and lets two requests wait. Of a burst of forty
long requests (plain and streamed) the excess is refused at once with 503 +
Retry-After (before any accepted one has finished: nothing queued beyond the
limit), every accepted request returns exactly the text it returns alone, the
peak memory stays bounded, and afterwards the server serves as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import ServerProcess
from tests.e2e.conftest import metric
from tests.reliability import load
from tests.reliability.conftest import SMALL_SERVER_SETTINGS
from tests.reliability.procstat import peak_rss_bytes, reset_peak_rss, rss_bytes

pytestmark = pytest.mark.anyio
CAPACITY = int(str(SMALL_SERVER_SETTINGS["max_num_seqs"])) + int(
    str(SMALL_SERVER_SETTINGS["max_waiting_requests"])
)
BURST = 10 * CAPACITY
LONG: dict[str, Any] = {
    "prompt": "two red circles and a blue square",
    "max_tokens": 150,
    "temperature": 0,
    "ignore_eos": True,
}
PEAK_GROWTH_LIMIT = 200 * 2**20


async def _one(http: Any, index: int) -> load.Outcome:
    if index % 2:
        return await load.stream(http, "/v1/completions", json={**LONG, "stream": True})
    return await load.post(http, "/v1/completions", json=LONG)


async def _overloaded_count(http: Any) -> float:
    text = await load.metrics_text(http)
    return metric(text, "mmgpt_request_failure_total", endpoint="completions", reason="overloaded")


async def test_a_burst_of_ten_times_capacity(small_server: ServerProcess) -> None:
    pid = small_server.process.pid
    async with load.client(small_server, connections=BURST + 4) as http:
        reference = await load.post(http, "/v1/completions", json=LONG)
        assert reference.status == 200 and reference.finish_reasons == ["length"]
        await load.wait_idle(http)
        refused_before = await _overloaded_count(http)
        reset_peak_rss(pid)
        baseline = rss_bytes(pid)

        outcomes = await asyncio.gather(*(_one(http, i) for i in range(BURST)))

        accepted = [o for o in outcomes if o.status == 200]
        refused = [o for o in outcomes if o.status != 200]
        assert 1 <= len(accepted) <= CAPACITY, [o.status for o in outcomes]
        for outcome in refused:
            assert outcome.status == 503 and outcome.error is not None
            assert outcome.error["code"] == "overloaded", outcome.error
            assert outcome.retry_after is not None and int(outcome.retry_after) >= 1
        assert max(o.ended for o in refused) < min(o.ended for o in accepted)  # at once
        for outcome in accepted:
            assert outcome.text == reference.text and outcome.finish_reasons == ["length"]
        growth = peak_rss_bytes(pid) - baseline
        assert growth < PEAK_GROWTH_LIMIT, f"peak RSS grew {growth / 2**20:.0f} MiB"
        assert await _overloaded_count(http) == refused_before + len(refused)

        await load.wait_idle(http)
        again = await asyncio.gather(*(_one(http, i) for i in range(2)))  # fits the queue
        assert [o.status for o in again] == [200, 200]
        assert all(o.text == reference.text for o in again)
