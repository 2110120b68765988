"""POST /v1/chat/completions: OpenAI Chat with image_url content parts."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

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
from app.api.images import check_image_count, image_intake, load_image_url
from app.api.sse import streamed_ok
from app.chat_schemas import (
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
    ToolCallDelta,
    ToolCallFunction,
    ToolCallSpec,
    TopLogprob,
)
from app.engine.sequence import ImageInput, RequestOutput, TokenLogprob
from app.errors import ERROR_RESPONSES
from app.prompts import Message
from app.schemas import Usage, response_schema
from app.service import Runtime
from app.tools import CallWatcher, ToolCall, ToolPlan, plan_tools

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
    adapter = check_model(runtime, body.model)
    messages, image_urls = template_messages(body.messages)
    images = await _load_images(runtime, image_urls)
    builder = runtime.prompts
    num_chars = sum(len(str(message["content"])) for message in messages)
    num_chars += sum(len(image.prompt_text) for image in images)  # tokenised too
    plan, shown_tools = _tools(body)
    image_tokens = [image.placeholder for image in images]
    prompt_ids = await builder.run(
        num_chars, builder.chat, messages, "messages", shown_tools, image_tokens
    )
    schema, param = _output_schema(body, plan)
    grammar = await compile_grammar(runtime, schema, param)
    defaults = sampling_defaults(runtime)
    params = body.to_sampling_params(defaults, defaults.rest_of_context(len(prompt_ids)), grammar)
    request_id = new_request_id("chatcmpl")
    model = adapter or runtime.model_id
    job = Job("chat", request_id, model, [prompt_ids], params, images, "messages", adapter)
    streams, renderer = submit(runtime, job), ChatRenderer(job, plan)
    return await respond(
        request, job, streams, renderer, stream=body.stream, include_usage=body.include_usage
    )


def _output_schema(
    body: ChatCompletionRequest, plan: ToolPlan | None
) -> tuple[dict[str, Any] | None, str]:
    """The JSON schema the output is held to, and the field that asked for it: a forced
    tool call's, else response_format's (the schemas refuse both together)."""
    if plan is not None and plan.mode == "forced":
        return plan.call_schema, "tool_choice"
    return response_schema(body.response_format), "response_format"


def _tools(body: ChatCompletionRequest) -> tuple[ToolPlan | None, list[dict[str, Any]] | None]:
    """The request's tool plan, and the tools the chat template shows the model."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or ()]
    choice = body.tool_choice_value
    return plan_tools(tools, choice), (tools if tools and choice != "none" else None)


class ImageRef(NamedTuple):
    """A chat image part: its URL, the request field it came in, its detail."""

    url: str
    param: str
    detail: str


def template_messages(messages: list[ChatMessage]) -> tuple[list[Message], list[ImageRef]]:
    """OpenAI messages -> chat-template messages, and the image URLs in order with their params.

    Text-only content becomes a plain string (what every template accepts); content
    with images keeps its parts, each image_url part becoming {"type": "image"}. An
    assistant's calls and a tool's answer keep the fields chat templates read.
    """
    converted: list[Message] = []
    image_urls: list[ImageRef] = []
    for message_index, message in enumerate(messages):
        content = _template_content(message, message_index, image_urls)
        entry: Message = {"role": message.role, "content": content}
        if message.tool_calls:
            entry["tool_calls"] = [_template_call(call) for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        converted.append(entry)
    return converted, image_urls


def _template_content(
    message: ChatMessage, message_index: int, image_urls: list[ImageRef]
) -> str | list[dict[str, str]]:
    content = message.content or ""
    if isinstance(content, str):
        return content
    texts = [part.text for part in content if isinstance(part, TextPart)]
    if len(texts) == len(content):
        return "\n".join(texts)
    parts: list[dict[str, str]] = []
    for part_index, part in enumerate(content):
        if isinstance(part, TextPart):
            parts.append({"type": "text", "text": part.text})
        else:
            param = f"messages.{message_index}.content.{part_index}.image_url.url"
            image_urls.append(ImageRef(part.image_url.url, param, part.image_url.detail or "auto"))
            parts.append({"type": "image"})
    return parts


def _template_call(call: ToolCallSpec) -> dict[str, Any]:
    """A call as chat templates take it: its arguments as an object where they parse."""
    try:
        arguments: Any = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    function = {"name": call.function.name, "arguments": arguments}
    return {"id": call.id, "type": "function", "function": function}


async def _load_images(runtime: Runtime, image_urls: list[ImageRef]) -> list[ImageInput]:
    if not image_urls:
        return []
    budget = image_intake(runtime, image_urls[0].param).token_budget()
    check_image_count(runtime, len(image_urls), "messages")
    return [
        await load_image_url(runtime, ref.url, budget, ref.param, ref.detail) for ref in image_urls
    ]


class ChatRenderer:
    """Builds chat.completion responses and chat.completion.chunk events from choices."""

    def __init__(self, job: Job, plan: ToolPlan | None = None) -> None:
        self.job = job
        self.plan = plan
        self.with_logprobs = job.params.logprobs is not None
        self._watchers: dict[int, CallWatcher] = {}  # by choice index, while streaming

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
        text, calls, reason = self._streamed(choice, output)
        if text or calls or reason or output.logprobs:
            item = ChatChunkChoice(
                index=choice.index,
                delta=ChatDelta(content=text or None, tool_calls=calls or None),
                logprobs=self._logprobs(output.logprobs or []),
                finish_reason=reason,
            )
            chunks.append(self._chunk(item))
        return chunks

    def _streamed(
        self, choice: Choice, output: RequestOutput
    ) -> tuple[str, list[ToolCallDelta], str | None]:
        """The content to send now, the calls found at the end, and the finish reason."""
        if self.plan is None:
            return output.text, [], output.finish_reason
        watcher = self._watchers.setdefault(choice.index, CallWatcher(self.plan))
        text = watcher.feed(output.text)
        if output.finish_reason is None:
            return text, [], None
        del self._watchers[choice.index]
        content, calls = watcher.finish()
        deltas = [
            ToolCallDelta(index=i, id=call.id, function=_call_function(call))
            for i, call in enumerate(calls)
        ]
        return text + (content or ""), deltas, "tool_calls" if calls else output.finish_reason

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk(None, usage)

    def response(self, tally: Tally) -> ChatCompletionResponse:
        job = self.job
        items = []
        for choice in tally.ordered():
            content, calls = self.plan.parse(choice.text) if self.plan else (choice.text, [])
            message = AssistantMessage(content=content, tool_calls=None)
            if calls:
                message.tool_calls = [
                    ToolCallSpec(id=call.id, function=_call_function(call)) for call in calls
                ]
            item = ChatChoice(
                index=choice.index,
                message=message,
                logprobs=self._logprobs(choice.logprobs),
                finish_reason="tool_calls" if calls else choice.finish_reason,
            )
            items.append(item)
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


def _call_function(call: ToolCall) -> ToolCallFunction:
    return ToolCallFunction(name=call.name, arguments=call.arguments)


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
