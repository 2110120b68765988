"""POST /v1/completions and its legacy alias POST /v1/engines/{engine}/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from app.api.deps import RuntimeDep, check_model
from app.api.generation import (
    Choice,
    Job,
    Tally,
    fit_to_context,
    gather,
    new_request_id,
    sampling_params,
    stream_events,
    submit,
)
from app.api.sse import EventStreamResponse, streamed_ok
from app.engine.sequence import RequestOutput, TokenLogprob
from app.errors import ERROR_RESPONSES
from app.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from app.service import Runtime

router = APIRouter(tags=["completions"])
OPENAI_DEFAULT_MAX_TOKENS = 16


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, **streamed_ok(CompletionResponse)},
    summary="Complete a text prompt (OpenAI Completions)",
)
async def create_completion(
    body: CompletionRequest, request: Request, runtime: RuntimeDep
) -> Response:
    return await complete(body, request, runtime, body.model)


@router.post(
    "/v1/engines/{engine}/completions",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, **streamed_ok(CompletionResponse)},
    summary="Complete a text prompt (legacy engine-style path; engine is the model id)",
)
async def create_engine_completion(
    engine: str, body: CompletionRequest, request: Request, runtime: RuntimeDep
) -> Response:
    return await complete(body, request, runtime, engine)


async def complete(
    body: CompletionRequest, request: Request, runtime: RuntimeDep, model: str | None
) -> Response:
    check_model(runtime, model)
    prompts = body.prompts()
    builder = runtime.prompts
    prompt_ids = [await builder.run(len(prompt), builder.completion, prompt) for prompt in prompts]
    base = sampling_params(
        body, runtime, stop=body.stop_list, logprobs=body.logprobs, logit_bias=body.logit_bias
    )
    requested = body.max_tokens or OPENAI_DEFAULT_MAX_TOKENS
    max_len = runtime.max_model_len
    params = [
        fit_to_context(base, requested, len(ids), max_len, "max_tokens") for ids in prompt_ids
    ]
    job = Job("completions", new_request_id("cmpl"), runtime.model_id, prompt_ids, params)
    echo = [_prompt_text(runtime, prompt) for prompt in prompts] if body.echo else None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond_with_text(request, runtime, job, body.stream, include_usage, echo)


def _prompt_text(runtime: Runtime, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else runtime.prompts.decode(prompt)


async def respond_with_text(
    request: Request,
    runtime: Runtime,
    job: Job,
    stream: bool,
    include_usage: bool,
    echo: list[str] | None = None,
) -> Response:
    """Answers in the completions shape: one JSON response or SSE chunks (also caption, QA)."""
    streams = submit(runtime, job)
    tally, render = Tally(job), TextRenderer(job, echo)
    if stream:
        usage_chunk = render.usage_chunk if include_usage else None
        return EventStreamResponse(stream_events(streams, tally, render.chunks, usage_chunk))
    if (left := await gather(request, streams, tally)) is not None:
        return left
    return JSONResponse(render.response(tally).model_dump(mode="json"))


class TextRenderer:
    """Builds completion-shaped chunks and responses from choices."""

    def __init__(self, job: Job, echo: list[str] | None) -> None:
        self.job = job
        self.echo = echo
        self.with_logprobs = job.params[0].logprobs is not None

    def chunks(self, choice: Choice, output: RequestOutput) -> list[CompletionResponse]:
        prefix = self._echo(choice) if choice.num_outputs == 1 else ""
        if not (prefix or output.text or output.finish_reason or output.logprobs):
            return []
        start = len(self._echo(choice)) + len(choice.text) - len(output.text)
        logprobs = self._logprobs(output.logprobs or [], start)
        item = CompletionChoice(
            index=choice.index,
            text=prefix + output.text,
            logprobs=logprobs,
            finish_reason=output.finish_reason,
        )
        return [self._envelope([item])]

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return self._envelope([], usage)

    def response(self, tally: Tally) -> CompletionResponse:
        items = [
            CompletionChoice(
                index=choice.index,
                text=self._echo(choice) + choice.text,
                logprobs=self._logprobs(choice.logprobs, len(self._echo(choice))),
                finish_reason=choice.finish_reason,
            )
            for choice in tally.ordered()
        ]
        return self._envelope(items, tally.usage())

    def _envelope(
        self, items: list[CompletionChoice], usage: Usage | None = None
    ) -> CompletionResponse:
        job = self.job
        return CompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=items, usage=usage
        )

    def _echo(self, choice: Choice) -> str:
        return self.echo[choice.index // self.job.n] if self.echo else ""

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> CompletionLogprobs | None:
        if not self.with_logprobs:
            return None
        text_offset = []
        for entry in entries:
            text_offset.append(offset)
            offset += len(entry.token)
        return CompletionLogprobs(  # built in one call so that its fields are validated
            tokens=[entry.token for entry in entries],
            token_logprobs=[entry.logprob for entry in entries],
            top_logprobs=[entry.top_logprobs for entry in entries],
            text_offset=text_offset,
        )
