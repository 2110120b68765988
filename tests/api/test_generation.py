"""The generation plumbing on scripted streams: merging, errors mid-stream, aborts, usage."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from app import metrics
from app.api.generation import Choice, Job, Tally, merged, stream_events
from app.api.sse import sse
from app.engine.sequence import RequestOutput, SamplingParams
from app.schemas import Usage

pytestmark = pytest.mark.anyio


class ScriptedStream:
    """Plays back outputs (or raises) like a RequestStream; records whether it was closed."""

    def __init__(self, request_id: str, script: list[RequestOutput | Exception]) -> None:
        self.request_id = request_id
        self.script = script
        self.closed = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._play()

    async def _play(self) -> AsyncIterator[RequestOutput]:
        for item in self.script:
            if isinstance(item, Exception):
                raise item
            yield item

    async def aclose(self) -> None:
        self.closed = True


def _out(index: int, text: str, finish: str | None = None, **fields: Any) -> RequestOutput:
    return RequestOutput("r", index, text, [1], finish, num_generated_tokens=1, **fields)


def _job(num_prompts: int = 1, n: int = 1) -> Job:
    params = SamplingParams(n=n, max_tokens=4)
    return Job("completions", "cmpl-x", "tiny", [[1, 2]] * num_prompts, params)


class _Text(BaseModel):
    text: str
    usage: Usage | None = None


class _Renderer:
    def chunks(self, choice: Choice, output: RequestOutput) -> list[_Text]:
        return [_Text(text=output.text)]

    def usage_chunk(self, usage: Usage) -> _Text:
        return _Text(text="", usage=usage)

    def response(self, tally: Tally) -> _Text:
        return _Text(text="".join(choice.text for choice in tally.ordered()))


async def test_merged_tags_outputs_with_their_prompt() -> None:
    first = ScriptedStream("a", [_out(0, "x"), _out(0, "y", "stop")])
    second = ScriptedStream("b", [_out(0, "z", "length")])
    seen = [(index, output.text) async for index, output in merged([first, second])]  # type: ignore[list-item]
    assert sorted(seen) == [(0, "x"), (0, "y"), (1, "z")]
    assert [text for index, text in seen if index == 0] == ["x", "y"]


async def test_tally_numbers_choices_across_prompts_and_samples() -> None:
    tally = Tally(_job(num_prompts=2, n=2))
    tally.add(1, _out(1, "b", "stop", num_prompt_tokens=2))
    tally.add(0, _out(0, "a", "length", num_prompt_tokens=2))
    assert [choice.index for choice in tally.ordered()] == [0, 3]
    assert tally.usage().prompt_tokens == 4 and tally.usage().completion_tokens == 2


async def _events(streams: list[ScriptedStream], include_usage: bool = False) -> list[str]:
    tally = Tally(_job())
    body = stream_events(streams, tally, _Renderer(), include_usage)  # type: ignore[arg-type]
    return [event async for event in body]


async def test_an_engine_error_mid_stream_becomes_an_error_event() -> None:
    before = metrics.REQUEST_FAILURE.labels("completions", "internal")._value.get()
    stream = ScriptedStream("r", [_out(0, "partial"), _out(0, "", "error", error="boom")])
    events = await _events([stream])
    assert events[0] == sse(_Text(text="partial"))
    error = json.loads(events[1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "boom" in error["message"]
    assert events[-1] == "data: [DONE]\n\n" and len(events) == 3
    assert stream.closed
    after = metrics.REQUEST_FAILURE.labels("completions", "internal")._value.get()
    assert after == before + 1


async def test_an_exception_mid_stream_becomes_an_error_event() -> None:
    stream = ScriptedStream("r", [_out(0, "a"), RuntimeError("loop died")])
    events = await _events([stream])
    error = json.loads(events[1].removeprefix("data: "))["error"]
    assert error["code"] == "internal_error" and events[-1] == "data: [DONE]\n\n"


async def test_closing_a_stream_early_aborts_every_engine_request() -> None:
    streams = [ScriptedStream("a", [_out(0, "x")] * 3), ScriptedStream("b", [_out(0, "y")] * 3)]
    body = stream_events(streams, Tally(_job(num_prompts=2)), _Renderer(), False)  # type: ignore[arg-type]
    assert (await body.__anext__()).startswith("data: ")
    await body.aclose()  # the client went away after one event
    assert all(stream.closed for stream in streams)


async def test_the_usage_chunk_comes_only_when_asked_for() -> None:
    def script() -> list[ScriptedStream]:
        outputs = [_out(0, "a", num_prompt_tokens=2), _out(0, "b", "stop")]
        return [ScriptedStream("r", outputs)]  # type: ignore[arg-type]

    plain = await _events(script())
    assert plain == [sse(_Text(text="a")), sse(_Text(text="b")), "data: [DONE]\n\n"]
    with_usage = await _events(script(), include_usage=True)
    assert with_usage[:2] == plain[:2] and with_usage[-1] == "data: [DONE]\n\n"
    usage = json.loads(with_usage[2].removeprefix("data: "))["usage"]
    assert usage == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
