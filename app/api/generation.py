"""From a validated request to engine streams and back, shared by every generating route.

A route turns its request into a `Job` (token ids and sampling parameters per
prompt, images), then either gathers the outputs into one response or streams
them as Server-Sent Events. Both paths abort the engine request when the client
goes away, and both record the request's outcome in the metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response

from app import metrics
from app.api.sse import SSE_DONE, sse
from app.engine.async_engine import RequestStream
from app.engine.errors import EngineError
from app.engine.sequence import ImageInput, RequestOutput, SamplingParams, TokenLogprob
from app.engine.structured import GrammarError
from app.errors import (
    CLIENT_CLOSED_REQUEST,
    APIError,
    bad_request,
    error_body,
    from_engine_error,
)
from app.schemas import SamplingFields, Usage, response_schema
from app.service import Runtime

logger = logging.getLogger("mmgpt.api")
_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class Job:
    """One HTTP request as the engine sees it: one engine request per prompt."""

    endpoint: str  # metrics label: completions, chat, caption, qa
    request_id: str
    model: str
    prompt_ids: list[list[int]]
    params: list[SamplingParams]  # per prompt (max_tokens fitted to each prompt's length)
    images: Sequence[ImageInput] = ()
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def n(self) -> int:
        return self.params[0].n


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(
    fields: SamplingFields,
    runtime: Runtime,
    *,
    stop: list[str],
    logprobs: int | None,
    logit_bias: dict[str, float] | None = None,
) -> SamplingParams:
    """The request's sampling fields; unset ones from the checkpoint's generation_config."""
    if logprobs is not None and logprobs > runtime.settings.max_logprobs:
        limit = runtime.settings.max_logprobs
        raise bad_request(f"logprobs may be at most {limit}.", "logprobs")
    chosen = {
        key: getattr(fields, key) for key in _DEFAULT_KEYS if getattr(fields, key) is not None
    }
    defaults = _generation_defaults(runtime.generation_defaults)
    return SamplingParams(
        **{**defaults, **chosen},
        n=fields.n,
        min_tokens=fields.min_tokens,
        presence_penalty=fields.presence_penalty,
        frequency_penalty=fields.frequency_penalty,
        stop=stop,
        ignore_eos=fields.ignore_eos,
        seed=fields.seed,
        logprobs=logprobs,
        logit_bias=_token_bias(logit_bias or {}, runtime.info.vocab_size),
    )


def _token_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """The schema-checked logit_bias by token id; zero biases, which change nothing, dropped
    (so that a greedy request keeps the sampler's fast path)."""
    by_id = {int(key): value for key, value in bias.items()}
    if any(token >= vocab_size for token in by_id):
        raise bad_request(f"logit_bias token ids must lie in [0, {vocab_size}).", "logit_bias")
    return {token: value for token, value in by_id.items() if value != 0.0}


async def with_response_format(
    params: SamplingParams, runtime: Runtime, response_format: dict[str, Any] | None
) -> SamplingParams:
    """`params` held to the JSON schema of the request's response_format, if any."""
    schema = response_schema(response_format)
    return await held_to_schema(params, runtime, schema, "response_format")


async def held_to_schema(
    params: SamplingParams, runtime: Runtime, schema: dict[str, Any] | None, param: str
) -> SamplingParams:
    """`params` held to `schema`, compiled off the event loop (a large schema, or the first
    one, which builds the tokenizer's grammar tables, takes a while)."""
    if schema is None:
        return params
    compile_schema = runtime.engine.structured.json_schema_grammar
    try:
        grammar = await anyio.to_thread.run_sync(compile_schema, schema)
    except GrammarError as exc:
        raise bad_request(str(exc), param) from exc
    return dataclasses.replace(params, grammar=grammar)


def _generation_defaults(config: dict[str, Any]) -> dict[str, Any]:
    defaults = {key: config[key] for key in _DEFAULT_KEYS if config.get(key) is not None}
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0  # the checkpoint asks for greedy decoding
    return defaults


def fit_to_context(
    params: SamplingParams,
    requested: int | None,
    num_prompt_tokens: int,
    max_model_len: int,
    param: str,
) -> SamplingParams:
    """Sets max_tokens: the request's, checked to fit, or the rest of the context."""
    if requested is None:
        room = max_model_len - num_prompt_tokens
        if room < 1:
            raise bad_request(
                f"The prompt has {num_prompt_tokens} tokens but the model's context is "
                f"{max_model_len} tokens, which leaves no room to generate.",
                param,
                code="context_length_exceeded",
            )
        requested = room
    elif num_prompt_tokens + requested > max_model_len:
        raise bad_request(
            f"The model's context is {max_model_len} tokens, but {num_prompt_tokens + requested} "
            f"were requested: {num_prompt_tokens} in the prompt and {requested} for the "
            "completion (max_tokens). Shorten the prompt or lower max_tokens.",
            param,
            code="context_length_exceeded",
        )
    if params.min_tokens > requested:
        raise bad_request(f"min_tokens may not exceed max_tokens ({requested}).", "min_tokens")
    return dataclasses.replace(params, max_tokens=requested)


def submit(runtime: Runtime, job: Job) -> list[RequestStream]:
    """Submits every prompt of the job; all or none (a refusal aborts the ones before it)."""
    engine, streams = runtime.engine, []
    try:
        for index, (token_ids, params) in enumerate(zip(job.prompt_ids, job.params, strict=True)):
            streams.append(
                engine.submit(f"{job.request_id}-{index}", token_ids, params, job.images)
            )
    except EngineError as error:
        for stream in streams:
            engine.abort(stream.request_id)
        raise from_engine_error(error) from None
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, each tagged with its prompt index."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as error:
            queue.put_nowait((index, error))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        unfinished = len(streams)
        while unfinished:
            index, item = await queue.get()
            if item is None:
                unfinished -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def close_all(streams: Iterable[RequestStream]) -> None:
    """Aborts what is unfinished; shielded so that it also runs while being cancelled."""
    with anyio.CancelScope(shield=True):
        for stream in streams:
            await stream.aclose()


@dataclass
class Choice:
    """The state of one output choice (one sample of one prompt)."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's tokens after the first
    finish_reason: str | None = None
    num_generated_tokens: int = 0
    error: str | None = None
    num_outputs: int = 0


class Tally:
    """Accumulates outputs into choices and usage; records the outcome in the metrics."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.choices: dict[int, Choice] = {}
        self.prompt_tokens = [len(ids) for ids in job.prompt_ids]

    def add(self, prompt_index: int, output: RequestOutput) -> Choice:
        index = prompt_index * self.job.n + output.index
        choice = self.choices.setdefault(index, Choice(index))
        choice.text += output.text
        choice.logprobs.extend(output.logprobs or ())
        if output.prompt_logprobs is not None:
            choice.prompt_logprobs = output.prompt_logprobs
        choice.num_generated_tokens = output.num_generated_tokens
        choice.finish_reason = output.finish_reason or choice.finish_reason
        choice.error = output.error or choice.error
        choice.num_outputs += 1
        if output.num_prompt_tokens:
            self.prompt_tokens[prompt_index] = output.num_prompt_tokens
        return choice

    def ordered(self) -> list[Choice]:
        return [self.choices[index] for index in sorted(self.choices)]

    def usage(self) -> Usage:
        prompt = sum(self.prompt_tokens)
        completion = sum(choice.num_generated_tokens for choice in self.choices.values())
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def failure(self) -> Choice | None:
        """The first choice that ended in an engine error or abort, if any."""
        for choice in self.ordered():
            if choice.finish_reason in ("error", "abort"):
                return choice
        return None

    def record_success(self) -> None:
        for prompt_index in range(len(self.job.prompt_ids)):
            start = prompt_index * self.job.n
            reasons = {
                self.choices[i].finish_reason
                for i in range(start, start + self.job.n)
                if i in self.choices
            }
            reason = "length" if "length" in reasons else "stop"
            metrics.record_request_success(self.job.endpoint, reason)

    def record_failure(self, reason: str) -> None:
        metrics.record_request_failure(self.job.endpoint, reason)


def failure_error(choice: Choice) -> APIError:
    if choice.finish_reason == "abort":
        return APIError(
            503, "The request was aborted: the server is shutting down.", code="aborted"
        )
    return APIError(
        500, f"Generation failed: {choice.error or 'engine error'}", code="engine_error"
    )


async def run_unless_disconnected(request: Request, work: Callable[[], Any]) -> bool:
    """Runs `await work()`; stops it when the client disconnects. True if it completed."""
    completed = False
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        await work()
        completed = True
        group.cancel_scope.cancel()
    return completed


async def gather(request: Request, streams: list[RequestStream], tally: Tally) -> Response | None:
    """Collects every output into `tally`. Returns a 499 response if the client left."""

    async def consume() -> None:
        async for prompt_index, output in merged(streams):
            tally.add(prompt_index, output)

    try:
        completed = await run_unless_disconnected(request, consume)
    finally:
        await close_all(streams)
    if not completed:
        tally.record_failure("client_disconnect")
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if (failed := tally.failure()) is not None:
        raise failure_error(failed)
    tally.record_success()
    return None


ChunkRenderer = Callable[[Choice, RequestOutput], Sequence[BaseModel]]


async def stream_events(
    streams: list[RequestStream],
    tally: Tally,
    render: ChunkRenderer,
    usage_chunk: Callable[[Usage], BaseModel] | None,
) -> AsyncGenerator[str, None]:
    """SSE lines for the outputs as they come; an error event if generation fails."""
    outcome = "client_disconnect"  # unless the loop below gets to an end
    try:
        try:
            async for prompt_index, output in merged(streams):
                choice = tally.add(prompt_index, output)
                if choice.finish_reason in ("error", "abort"):
                    raise failure_error(choice)
                for chunk in render(choice, output):
                    yield sse(chunk)
            if usage_chunk is not None:
                yield sse(usage_chunk(tally.usage()))
            outcome = "success"
        except Exception as error:
            outcome = "internal"
            yield sse(_stream_error_body(error))
        yield SSE_DONE
    finally:
        await close_all(streams)
        tally.record_success() if outcome == "success" else tally.record_failure(outcome)


def _stream_error_body(error: Exception) -> dict[str, Any]:
    """The error event of a stream whose 200 status was already sent."""
    if isinstance(error, APIError):
        return error_body(error.status_code, error.message, code=error.code)
    logger.exception("Streaming failed", exc_info=error)
    return error_body(500, "Internal server error.", code="internal_error")
