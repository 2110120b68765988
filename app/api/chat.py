"""POST /v1/chat/completions: OpenAI Chat with image_url content parts."""

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
    with_response_format,
)
from app.api.images import check_image_count, image_intake, load_image_url
from app.api.sse import EventStreamResponse, streamed_ok
from app.engine.sequence import ImageInput, RequestOutput, TokenLogprob
from app.errors import ERROR_RESPONSES
from app.prompts import Message
from app.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    TextPart,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)
from app.service import Runtime

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERROR_RESPONSES, **streamed_ok(ChatCompletionChunk)},
    summary="Chat, with images as image_url content parts (OpenAI Chat Completions)",
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, runtime: RuntimeDep
) -> Response:
    check_model(runtime, body.model)
    messages, image_urls = template_messages(body.messages)
    images = await _load_images(runtime, image_urls)
    builder = runtime.prompts
    num_chars = sum(len(str(message["content"])) for message in messages)
    prompt_ids = await builder.run(num_chars, builder.chat, messages, len(images))
    base = sampling_params(
        body,
        runtime,
        stop=body.stop_list,
        logprobs=body.logprobs_count,
        logit_bias=body.logit_bias,
    )
    base = await with_response_format(base, runtime, body.response_format)
    max_len = runtime.max_model_len
    requested = body.requested_max_tokens
    params = fit_to_context(base, requested, len(prompt_ids), max_len, "max_tokens")
    job = Job("chat", new_request_id("chatcmpl"), runtime.model_id, [prompt_ids], [params], images)
    streams = submit(runtime, job)
    tally, render = Tally(job), ChatRenderer(job)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage_chunk = render.usage_chunk if include_usage else None
        return EventStreamResponse(stream_events(streams, tally, render.chunks, usage_chunk))
    if (left := await gather(request, streams, tally)) is not None:
        return left
    return JSONResponse(render.response(tally).model_dump(mode="json"))


def template_messages(messages: list[ChatMessage]) -> tuple[list[Message], list[tuple[str, str]]]:
    """OpenAI messages -> chat-template messages, and the image URLs in order with their params.

    Text-only content becomes a plain string (what every template accepts); content
    with images keeps its parts, each image_url part becoming {"type": "image"}.
    """
    converted: list[Message] = []
    image_urls: list[tuple[str, str]] = []
    for message_index, message in enumerate(messages):
        content = message.content or ""
        if isinstance(content, str):
            converted.append({"role": message.role, "content": content})
            continue
        texts = [part.text for part in content if isinstance(part, TextPart)]
        if len(texts) == len(content):
            converted.append({"role": message.role, "content": "\n".join(texts)})
            continue
        parts: list[dict[str, str]] = []
        for part_index, part in enumerate(content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                param = f"messages.{message_index}.content.{part_index}.image_url.url"
                image_urls.append((part.image_url.url, param))
                parts.append({"type": "image"})
        converted.append({"role": message.role, "content": parts})
    return converted, image_urls


async def _load_images(runtime: Runtime, image_urls: list[tuple[str, str]]) -> list[ImageInput]:
    if not image_urls:
        return []
    image_intake(runtime, image_urls[0][1])
    check_image_count(runtime, len(image_urls), "messages")
    return [await load_image_url(runtime, url, param) for url, param in image_urls]


class ChatRenderer:
    """Builds chat.completion responses and chat.completion.chunk events from choices."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.with_logprobs = job.params[0].logprobs is not None

    def chunks(self, choice: Choice, output: RequestOutput) -> list[ChatCompletionChunk]:
        chunks = []
        if choice.num_outputs == 1:  # the first event of a choice names the role
            chunks.append(
                self._chunk(
                    ChatChunkChoice(
                        index=choice.index, delta=ChatDelta(role="assistant", content="")
                    )
                )
            )
        if output.text or output.finish_reason or output.logprobs:
            item = ChatChunkChoice(
                index=choice.index,
                delta=ChatDelta(content=output.text) if output.text else ChatDelta(),
                logprobs=self._logprobs(output.logprobs or []),
                finish_reason=output.finish_reason,
            )
            chunks.append(self._chunk(item))
        return chunks

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk(None, usage)

    def response(self, tally: Tally) -> ChatCompletionResponse:
        job = self.job
        items = [
            ChatChoice(
                index=choice.index,
                message=AssistantMessage(content=choice.text),
                logprobs=self._logprobs(choice.logprobs),
                finish_reason=choice.finish_reason,
            )
            for choice in tally.ordered()
        ]
        return ChatCompletionResponse(
            id=job.request_id,
            created=job.created,
            model=job.model,
            choices=items,
            usage=tally.usage(),
        )

    def _chunk(
        self, item: ChatChunkChoice | None, usage: Usage | None = None
    ) -> ChatCompletionChunk:
        job = self.job
        return ChatCompletionChunk(
            id=job.request_id,
            created=job.created,
            model=job.model,
            choices=[item] if item else [],
            usage=usage,
        )

    def _logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.with_logprobs:
            return None
        return ChatLogprobs(content=[_logprob_entry(entry) for entry in entries])


def _logprob_entry(entry: TokenLogprob) -> TokenLogprobEntry:
    alternatives = [
        TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8", "replace")))
        for token, logprob in entry.top_logprobs.items()
    ]
    return TokenLogprobEntry(
        token=entry.token,
        logprob=entry.logprob,
        bytes=list(entry.token.encode("utf-8", "replace")),
        top_logprobs=alternatives,
    )
