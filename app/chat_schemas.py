"""Request and response models of /v1/chat/completions: messages with images and tool
turns, tools and tool_choice, and the chat.completion and chat.completion.chunk shapes.
Shared field types and checks come from app/schemas.py and app/sampling_fields.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from app.sampling_fields import JSONInt, SamplingFields
from app.schemas import (
    MAX_STOP_STRINGS,
    STRICT_JSON,
    LogitBias,
    Logprob,
    ResponseFormat,
    StopField,
    StreamOptions,
    Usage,
    bias_by_token_id,
    check_structured,
    response_schema,
    stop_list_of,
    usage_requested,
)


class TextPart(BaseModel):
    model_config = STRICT_JSON

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = STRICT_JSON

    url: str = Field(description="A data:image/...;base64 URL, or http(s) on allowed hosts.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = STRICT_JSON

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


MAX_TOOLS = 128
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class ToolCallFunction(BaseModel):
    model_config = STRICT_JSON

    name: str
    arguments: str = Field(description="The arguments, as JSON text.")


class ToolCallSpec(BaseModel):
    """A call the assistant made: in an assistant message, and in a response."""

    model_config = STRICT_JSON

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = STRICT_JSON

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(
        default=None, description="Text or content parts."
    )
    name: str | None = None
    tool_calls: list[ToolCallSpec] | None = Field(
        default=None, description="An assistant message's calls."
    )
    tool_call_id: str | None = Field(
        default=None, description="A tool message's answer is to this call."
    )

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages hold tool_calls")
        return self


class ToolFunction(BaseModel):
    model_config = STRICT_JSON

    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="A JSON schema of the arguments."
    )
    strict: bool | None = Field(default=None, description="Arguments always follow the schema.")


class ToolSpec(BaseModel):
    model_config = STRICT_JSON

    type: Literal["function"]
    function: ToolFunction


class NamedFunction(BaseModel):
    model_config = STRICT_JSON

    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT_JSON

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(SamplingFields):
    model_config = STRICT_JSON

    model: str | None = Field(
        default=None, description="Model id; must be the served one if given."
    )
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    stop: StopField = None
    max_completion_tokens: JSONInt | None = Field(
        default=None, ge=1, description="Alias of max_tokens."
    )
    logprobs: bool = Field(default=False, description="Return log probabilities of output tokens.")
    top_logprobs: JSONInt | None = Field(
        default=None, ge=0, description="Alternatives per token, with logprobs."
    )
    stream: bool = Field(default=False, description="Stream Server-Sent Events ending in [DONE].")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    user: str | None = Field(default=None, description="End-user id; accepted and ignored.")
    logit_bias: LogitBias = None
    tools: list[ToolSpec] | None = Field(
        default=None, max_length=MAX_TOOLS, description="Functions the model may call."
    )
    tool_choice: ToolChoice | None = Field(
        default=None,
        description="none, auto (the default with tools), required, or one named function. "
        "With required or a name the call is held to the tools' schemas.",
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="Accepted; a forced call is one call."
    )
    response_format: ResponseFormat = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        check_structured(self.response_format, self.min_tokens)
        self._check_tools()
        if len(self.stop_list) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return stop_list_of(self.stop)

    @property
    def include_usage(self) -> bool:
        return usage_requested(self.stream_options)

    def max_tokens_or(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    @property
    def logit_bias_by_id(self) -> dict[int, float]:
        return bias_by_token_id(self.logit_bias)

    @property
    def tool_choice_value(self) -> str | dict[str, Any]:
        """tool_choice as plain data; unset: auto with tools, none without."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        return choice if isinstance(choice, str) else choice.model_dump()

    def _check_tools(self) -> None:
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be distinct")
        choice = self.tool_choice_value
        if isinstance(choice, dict) and choice["function"]["name"] not in names:
            raise ValueError(f"tool_choice names {choice['function']['name']!r}, not a tool")
        if choice == "required" and not names:
            raise ValueError("tool_choice required needs tools")
        if choice != "none" and response_schema(self.response_format) is not None:
            raise ValueError("response_format cannot be combined with tools")

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TopLogprob(BaseModel):
    token: str
    logprob: Logprob
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallSpec] | None = None

    @model_serializer(mode="wrap")
    def _calls_only_if_any(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    """A call in a stream: sent whole, in one delta."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A delta carries only what changed: absent fields are left out, not null."""
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
