"""From a validated request to engine streams and back, shared by every generating route.

A route turns its request into a `Job` (token ids per prompt, the request's
SamplingParams, images), submits it, and `respond`s: one JSON response, or the
stream of events every streaming route sends. Both paths abort the engine
requests when the client goes away, and both record the outcome in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import Response

from app import metrics
from app.api.sse import SSE_DONE, EventStreamResponse, sse
from app.engine.async_engine import RequestStream
from app.engine.errors import EngineError
from app.engine.sequence import ImageInput, RequestOutput, SamplingParams, TokenLogprob
from app.engine.structured import GrammarError
from app.engine.validation import validate_context, validate_prompt
from app.errors import (
    CLIENT_CLOSED_REQUEST,
    APIError,
    bad_request,
    error_body,
    from_engine_error,
)
from app.sampling_fields import SamplingDefaults
from app.schemas import Usage
from app.service import Runtime

logger = logging.getLogger("mmgpt.api")


@dataclass
class Job:
    """One HTTP request as the engine sees it: one engine request per prompt."""

    endpoint: str  # metrics label: completions, chat, caption, qa
    request_id: str
    model: str
    prompt_ids: list[list[int]]
    params: SamplingParams  # the same for every prompt
    images: Sequence[ImageInput] = ()
    prompt_param: str = "prompt"  # the request field the prompt comes from, named in refusals
    adapter: str | None = None  # the LoRA adapter the request names; None: the base model
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def n(self) -> int:
        return self.params.n


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_defaults(runtime: Runtime) -> SamplingDefaults:
    return SamplingDefaults.of(runtime.generation_defaults, runtime.max_model_len)


async def compile_grammar(
    runtime: Runtime, schema: dict[str, Any] | None, param: str
) -> str | None:
    """The grammar that holds the output to `schema`, compiled off the event loop (a large
    schema, or the first one, which builds the tokenizer's grammar tables, takes a while)."""
    if schema is None:
        return None
    compile_schema = runtime.engine.structured.json_schema_grammar
    try:
        grammar: str = await anyio.to_thread.run_sync(compile_schema, schema)
    except GrammarError as exc:
        raise bad_request(str(exc), param) from exc
    return grammar


def submit(runtime: Runtime, job: Job) -> list[RequestStream]:
    """Submits every prompt of the job, all or none: a refusal aborts the ones before it."""
    engine, streams = runtime.engine, []
    try:
        _check_batch(runtime, job)
        for index, token_ids in enumerate(job.prompt_ids):
            request_id = f"{job.request_id}-{index}"
            streams.append(
                engine.submit(request_id, token_ids, job.params, job.images, job.adapter)
            )
    except EngineError as error:
        for stream in streams:
            engine.abort(stream.request_id)
        raise _refusal(job, error) from None
    return streams


def _check_batch(runtime: Runtime, job: Job) -> None:
    """The engine's prompt rules, on every prompt of a batch before any is submitted: a
    refused prompt then leaves no trace of the others in the engine (nor in its metrics)."""
    if len(job.prompt_ids) < 2:
        return
    for token_ids in job.prompt_ids:
        validate_prompt(token_ids, runtime.info)
        validate_context(len(token_ids), job.params.max_tokens, runtime.max_model_len)


def _refusal(job: Job, error: EngineError) -> APIError:
    """The engine's refusal, naming the request's own field where the engine says "prompt"."""
    refusal = from_engine_error(error)
    if refusal.param == "prompt":
        refusal.param = job.prompt_param
    return refusal


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


class Renderer(Protocol):
    """An endpoint's shapes: chunks of a stream, its usage-only chunk, the whole response."""

    def chunks(self, choice: Choice, output: RequestOutput) -> Sequence[BaseModel]: ...

    def usage_chunk(self, usage: Usage) -> BaseModel: ...

    def response(self, tally: Tally) -> BaseModel: ...


async def respond(
    request: Request,
    job: Job,
    streams: list[RequestStream],
    renderer: Renderer,
    *,
    stream: bool,
    include_usage: bool,
) -> Response:
    """The answer of every generating route: one JSON response, or its stream of events."""
    tally = Tally(job)
    if stream:
        return EventStreamResponse(stream_events(streams, tally, renderer, include_usage))
    if (left := await gather(request, streams, tally)) is not None:
        return left
    return JSONResponse(renderer.response(tally).model_dump(mode="json"))


async def stream_events(
    streams: list[RequestStream], tally: Tally, renderer: Renderer, include_usage: bool
) -> AsyncGenerator[str, None]:
    """The events of every stream: each output's chunks as they come; the usage-only chunk
    (`choices: []`) when the request asked for it; an error event if generation fails; [DONE]."""
    outcome = "client_disconnect"  # unless the loop below gets to an end
    try:
        try:
            async for prompt_index, output in merged(streams):
                choice = tally.add(prompt_index, output)
                if choice.finish_reason in ("error", "abort"):
                    raise failure_error(choice)
                for chunk in renderer.chunks(choice, output):
                    yield sse(chunk)
            if include_usage:
                yield sse(renderer.usage_chunk(tally.usage()))
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
