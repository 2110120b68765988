"""StreamPacer: a fast stream's outputs are held and joined, nothing is lost or reordered;
and through AsyncEngine, what a paced stream delivers equals what an unpaced one does."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from app.engine.async_engine import AsyncEngine, RequestStream
from app.engine.config import EngineConfig
from app.engine.pacing import StreamPacer, joined_outputs
from app.engine.request import Delivery
from app.engine.sequence import RequestOutput, SamplingParams, TokenLogprob
from models.base import LoadedModel

SINK = object()
NEVER_DUE = 1e9  # seconds: an interval no test reaches


def token(request_id: str, n: int, text: str, finish: str | None = None) -> Delivery:
    """The n-th output token of sample 0 of `request_id`."""
    output = RequestOutput(request_id, 0, text, [n], finish, num_generated_tokens=n)
    return Delivery(SINK, output)


def texts(deliveries: list[Delivery]) -> list[str]:
    return [delivery.output.text for delivery in deliveries]


def test_without_an_interval_every_output_goes_at_once() -> None:
    pacer = StreamPacer(0.0)
    step = [token("a", 1, "x"), token("b", 1, "y")]
    assert pacer.pace(step, now=0.0, next_step_s=0.001) == step
    assert pacer.pace([token("a", 2, "z")], now=0.0001, next_step_s=0.001)[0].output.text == "z"


def test_outputs_within_the_interval_are_held_then_sent_joined() -> None:
    pacer = StreamPacer(0.010)
    assert texts(pacer.pace([token("a", 1, "A")], now=0.0, next_step_s=0.001)) == ["A"]
    assert pacer.pace([token("a", 2, "b")], now=0.002, next_step_s=0.001) == []
    assert pacer.pace([token("a", 3, "c")], now=0.004, next_step_s=0.001) == []
    assert pacer.num_held == 1
    (sent,) = pacer.pace([token("a", 4, "d")], now=0.010, next_step_s=0.001)
    assert sent.output.text == "bcd" and sent.output.token_ids == [2, 3, 4]
    assert sent.output.num_generated_tokens == 4 and sent.sink is SINK
    assert pacer.num_held == 0


def test_an_output_goes_early_rather_than_wait_for_a_step_ending_past_its_deadline() -> None:
    pacer = StreamPacer(0.010)
    pacer.pace([token("a", 1, "A")], now=0.0, next_step_s=0.001)
    assert pacer.pace([token("a", 2, "b")], now=0.005, next_step_s=0.004) == []
    assert texts(pacer.pace([token("a", 3, "c")], now=0.007, next_step_s=0.004)) == ["bc"]


def test_the_last_output_takes_the_held_ones_and_the_stream_is_forgotten() -> None:
    pacer = StreamPacer(NEVER_DUE)
    pacer.pace([token("a", 1, "A")], now=0.0, next_step_s=0.0)
    pacer.pace([token("a", 2, "b")], now=0.0, next_step_s=0.0)
    (last,) = pacer.pace([token("a", 3, "c", finish="length")], now=0.0, next_step_s=0.0)
    assert last.output.text == "bc" and last.output.finish_reason == "length"
    assert pacer.num_held == 0
    # a later request under the same id starts afresh: its first output is not held
    assert texts(pacer.pace([token("a", 1, "again")], now=0.0, next_step_s=0.0)) == ["again"]


def test_streams_are_paced_apart() -> None:
    pacer = StreamPacer(0.010)
    pacer.pace([token("a", 1, "A")], now=0.0, next_step_s=0.001)
    sent = pacer.pace([token("a", 2, "b"), token("b", 1, "B")], now=0.005, next_step_s=0.001)
    assert texts(sent) == ["B"]  # b's first output; a's second waits
    sent = pacer.pace([token("a", 3, "c"), token("b", 2, "x")], now=0.011, next_step_s=0.001)
    assert texts(sent) == ["bc"]  # a's interval has passed, b's has not
    assert pacer.num_held == 1


def test_joined_outputs_keep_logprobs_in_order_and_the_prompts_once() -> None:
    first_lp, then_lp = TokenLogprob(5, "a", -0.5, {}), TokenLogprob(6, "b", -1.5, {})
    prompt = [TokenLogprob(1, "p", -2.0, {})]
    first = RequestOutput(
        "r",
        1,
        "a",
        [5],
        logprobs=[first_lp],
        prompt_logprobs=prompt,
        num_prompt_tokens=3,
        num_cached_tokens=2,
        num_generated_tokens=1,
    )
    then = RequestOutput("r", 1, "b", [6], "stop", logprobs=[then_lp], num_generated_tokens=2)
    joined = joined_outputs(first, then)
    assert joined.logprobs == [first_lp, then_lp] and joined.prompt_logprobs == prompt
    assert (joined.text, joined.token_ids, joined.index) == ("ab", [5, 6], 1)
    assert (joined.num_prompt_tokens, joined.num_cached_tokens) == (3, 2)
    assert (joined.finish_reason, joined.num_generated_tokens) == ("stop", 2)
    no_logprobs = joined_outputs(RequestOutput("r", 0, "a", [5]), RequestOutput("r", 0, "b", [6]))
    assert no_logprobs.logprobs is None


# ---- through the engine --------------------------------------------------------------


def engine_with_interval(loaded: LoadedModel, interval_ms: float) -> AsyncEngine:
    config = EngineConfig(model=loaded.path, num_threads=1, stream_interval_ms=interval_ms)
    engine = AsyncEngine(config, loaded)
    engine.start()
    return engine


def prompt_ids(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(12)]


async def outputs_of(stream: RequestStream) -> list[RequestOutput]:
    return [output async for output in stream]


def generate(engine: AsyncEngine, params: SamplingParams) -> list[RequestOutput]:
    async def main() -> list[RequestOutput]:
        return await outputs_of(engine.submit("r", prompt_ids(1), params))

    return asyncio.run(main())


def test_a_paced_stream_delivers_what_an_unpaced_one_does(llama: LoadedModel) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    runs: dict[float, list[RequestOutput]] = {}
    for interval_ms in (0.0, NEVER_DUE * 1000):
        engine = engine_with_interval(llama, interval_ms)
        try:
            runs[interval_ms] = generate(engine, params)
        finally:
            engine.stop()
    each, paced = runs[0.0], runs[NEVER_DUE * 1000]
    assert len(each) == 24 and len(paced) == 2  # the first token, then the rest at the end
    assert [len(output.token_ids) for output in paced] == [1, 23]
    assert "".join(o.text for o in paced) == "".join(o.text for o in each)
    assert [t for o in paced for t in o.token_ids] == [t for o in each for t in o.token_ids]
    assert paced[-1].finish_reason == each[-1].finish_reason == "length"
    assert paced[-1].num_generated_tokens == 24


def test_an_abort_sends_the_held_tokens_with_it(llama: LoadedModel) -> None:
    engine = engine_with_interval(llama, NEVER_DUE * 1000)

    async def main() -> list[RequestOutput]:
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        stream = engine.submit("held", prompt_ids(2), params)
        outputs = [await stream.__anext__()]  # the first token is never held
        engine.abort("held")
        return outputs + await outputs_of(stream)

    try:
        outputs: Any = asyncio.run(main())
    finally:
        engine.stop()
    last = outputs[-1]
    assert last.finish_reason == "abort" and not any(o.finished for o in outputs[:-1])
    token_ids = [t for o in outputs for t in o.token_ids]
    assert len(token_ids) == last.num_generated_tokens < 200
    decoded = engine.tokenizer.decode(token_ids, skip_special_tokens=True)
    assert decoded.startswith("".join(o.text for o in outputs))  # bar a split character
