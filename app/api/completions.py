"""POST /v1/completions and its legacy alias POST /v1/engines/{engine}/completions."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.deps import RuntimeDep, check_model
from app.api.generation import (
    Choice,
    Job,
    Tally,
    compile_grammar,
    new_request_id,
    respond,
    sampling_defaults,
    submit,
)
from app.api.sse import streamed_ok
from app.engine.sequence import RequestOutput, TokenLogprob
from app.errors import ERROR_RESPONSES, bad_request
from app.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    response_schema,
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
    adapter = check_model(runtime, model)
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens may be 0 only with echo (to score the prompt).", "max_tokens")
    prompts = body.prompts()
    builder = runtime.prompts
    prompt_ids = [await builder.run(len(prompt), builder.completion, prompt) for prompt in prompts]
    schema = response_schema(body.response_format)
    grammar = await compile_grammar(runtime, schema, "response_format")
    params = body.to_sampling_params(sampling_defaults(runtime), OPENAI_DEFAULT_MAX_TOKENS, grammar)
    request_id, served = new_request_id("cmpl"), adapter or runtime.model_id
    job = Job("completions", request_id, served, prompt_ids, params, adapter=adapter)
    streams = submit(runtime, job)  # the engine checks the prompts before the echo decodes them
    echo = _echo(runtime, prompts, prompt_ids, body.scores_prompt_only) if body.echo else None
    renderer = TextRenderer(job, echo)
    return await respond(
        request, job, streams, renderer, stream=body.stream, include_usage=body.include_usage
    )


@dataclass
class Echo:
    """The prompts put back before their completions."""

    texts: list[str]  # per prompt
    first_tokens: list[str]  # per prompt, the text of its first token, which nothing predicts
    score_only: bool = False  # max_tokens 0: nothing generated is shown


def _echo(
    runtime: Runtime,
    prompts: list[str | list[int]],
    prompt_ids: list[list[int]],
    score_only: bool,
) -> Echo:
    texts = [
        prompt if isinstance(prompt, str) else runtime.prompts.decode(prompt) for prompt in prompts
    ]
    return Echo(texts, [runtime.prompts.decode(ids[:1]) for ids in prompt_ids], score_only)


class TextRenderer:
    """Builds completion-shaped chunks and responses from choices (also caption, QA)."""

    def __init__(self, job: Job, echo: Echo | None = None) -> None:
        self.job = job
        self.echo = echo
        self.with_logprobs = job.params.logprobs is not None

    def chunks(self, choice: Choice, output: RequestOutput) -> list[CompletionResponse]:
        prefix = self._echo(choice) if choice.num_outputs == 1 else ""
        text, entries, reason = self._shown(
            output.text, output.logprobs or [], output.finish_reason
        )
        if not (prefix or text or reason or entries):
            return []
        start = len(self._echo(choice)) + len(choice.text) - len(output.text)
        scored_prompt = output.prompt_logprobs if choice.num_outputs == 1 else None
        item = CompletionChoice(
            index=choice.index,
            text=prefix + text,
            logprobs=self._logprobs(choice, scored_prompt, entries, start),
            finish_reason=reason,
        )
        return [self._envelope([item])]

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return self._envelope([], self._usage(usage))

    def response(self, tally: Tally) -> CompletionResponse:
        items = []
        for choice in tally.ordered():
            text, entries, reason = self._shown(choice.text, choice.logprobs, choice.finish_reason)
            echo = self._echo(choice)
            logprobs = self._logprobs(choice, choice.prompt_logprobs, entries, len(echo))
            item = CompletionChoice(
                index=choice.index, text=echo + text, logprobs=logprobs, finish_reason=reason
            )
            items.append(item)
        return self._envelope(items, self._usage(tally.usage()))

    def _shown(
        self, text: str, entries: list[TokenLogprob], reason: str | None
    ) -> tuple[str, list[TokenLogprob], str | None]:
        """What the client sees of the generated part: none of it when only the prompt
        is scored (max_tokens 0), which ends for want of tokens."""
        if self.echo is not None and self.echo.score_only:
            return "", [], reason and "length"
        return text, entries, reason

    def _usage(self, usage: Usage) -> Usage:
        if self.echo is None or not self.echo.score_only:
            return usage
        prompt = usage.prompt_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=0, total_tokens=prompt)

    def _envelope(
        self, items: list[CompletionChoice], usage: Usage | None = None
    ) -> CompletionResponse:
        job = self.job
        return CompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=items, usage=usage
        )

    def _echo(self, choice: Choice) -> str:
        return self.echo.texts[choice.index // self.job.n] if self.echo else ""

    def _logprobs(
        self,
        choice: Choice,
        scored_prompt: list[TokenLogprob] | None,
        entries: list[TokenLogprob],
        offset: int,
    ) -> CompletionLogprobs | None:
        """The generated tokens' logprobs from `offset` in the text; with `scored_prompt`,
        preceded by the echoed prompt's, from 0 (its first token has none: null)."""
        if not self.with_logprobs:
            return None
        rows: list[tuple[str, float | None, dict[str, float] | None, int]] = []
        if scored_prompt is not None and self.echo is not None:
            first = self.echo.first_tokens[choice.index // self.job.n]
            rows.append((first, None, None, 0))
            at = len(first)
            for entry in scored_prompt:
                rows.append((entry.token, entry.logprob, entry.top_logprobs, at))
                at += len(entry.token)
        for entry in entries:
            rows.append((entry.token, entry.logprob, entry.top_logprobs, offset))
            offset += len(entry.token)
        return CompletionLogprobs(  # built in one call so that its fields are validated
            tokens=[row[0] for row in rows],
            token_logprobs=[row[1] for row in rows],
            top_logprobs=[row[2] for row in rows],
            text_offset=[row[3] for row in rows],
        )
