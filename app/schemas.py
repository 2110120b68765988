"""Request and response models: OpenAI-compatible shapes, every field documented.

This module holds what every endpoint shares (strict JSON, stop strings, logit_bias,
response_format) and the completions, vision and model-listing shapes; the sampling fields,
and their translation into the engine's SamplingParams, are in app/sampling_fields.py; the
chat endpoint's shapes, with images and tools, are in app/chat_schemas.py.

Unknown request fields are ignored (clients send extras such as `user`); known
fields that would change the result but are not supported are refused with a
400 rather than silently ignored. JSON bodies are strictly typed, as the schema
says: "5" is not an integer and 0 is not a boolean (but 5.0 is the integer 5, as
in JSON Schema). Multipart forms, whose values are all text, are parsed as usual.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.sampling_fields import JSONInt, SamplingFields

MAX_STOP_STRINGS = 64
MAX_PROMPTS = 128
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: an impossible token's logprob is reported as this
MAX_LOGIT_BIAS = 1024  # biased tokens per request
MAX_BIAS = 100.0  # OpenAI's range: -100 all but bans a token, +100 all but forces it
MAX_TOKEN_ID_DIGITS = 10  # token ids are int32


def _json_logprob(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


# JSON request bodies: unknown fields ignored, known ones taken only with their own JSON type.
STRICT_JSON = ConfigDict(extra="ignore", strict=True)


# A log probability as sent: finite, so that every response serialises as JSON.
Logprob = Annotated[float, AfterValidator(_json_logprob)]


def _check_logit_bias(bias: dict[str, float] | None) -> dict[str, float] | None:
    """Keys are token ids in canonical decimal form ("7", not "07"), biases in [-100, 100]."""
    if not bias:
        return bias
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
    for key, value in bias.items():
        canonical = key.isascii() and key.isdigit() and (key == "0" or key[0] != "0")
        if not canonical or len(key) > MAX_TOKEN_ID_DIGITS:
            raise ValueError(f"keys must be token ids written as decimal integers, not {key!r}")
        if not -MAX_BIAS <= value <= MAX_BIAS:  # NaN fails too
            raise ValueError(f"biases must lie in [-100, 100], not {value}")
    return bias


LogitBias = Annotated[
    dict[str, float] | None,
    AfterValidator(_check_logit_bias),
    Field(
        description="Token id (as a string) -> bias in [-100, 100], added to that token's "
        "logit before sampling."
    ),
]


def bias_by_token_id(bias: dict[str, float] | None) -> dict[int, float]:
    """A checked logit_bias by token id; zero biases, which change nothing, dropped (so that a
    greedy request keeps the sampler's fast path). The engine checks the ids' range."""
    return {int(key): value for key, value in (bias or {}).items() if value != 0.0}


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _check_response_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if value.get("type") not in RESPONSE_FORMATS:
        raise ValueError(f"type must be one of {', '.join(RESPONSE_FORMATS)}")
    if value["type"] == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError("json_schema must be an object whose schema is a JSON schema")
    return value


ResponseFormat = Annotated[
    dict[str, Any] | None,
    AfterValidator(_check_response_format),
    Field(
        description="{'type': 'text'}, {'type': 'json_object'} (any JSON object), or "
        "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}: the output is "
        "JSON that matches the schema (unless cut short by max_tokens)."
    ),
]


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema the output must match; None for free text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        assert response_format is not None
        schema: dict[str, Any] = response_format["json_schema"].get("schema") or {}
        return schema
    return None


def check_structured(response_format: dict[str, Any] | None, min_tokens: int) -> None:
    if min_tokens and response_schema(response_format) is not None:
        raise ValueError("min_tokens cannot be combined with a JSON response_format")


class StreamOptions(BaseModel):
    model_config = STRICT_JSON

    include_usage: bool = Field(default=False, description="Send a last chunk with token usage.")


def usage_requested(options: StreamOptions | None) -> bool:
    return bool(options and options.include_usage)


StopField = Annotated[
    str | list[str] | None,
    Field(description="Up to 64 strings that end generation; not included in the output."),
]


def stop_list_of(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _refuse_unsupported(values: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if values.get(name):
            raise ValueError(f"{name} is not supported by this server")


# --- /v1/completions -------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    model_config = STRICT_JSON

    model: str | None = Field(
        default=None, description="Model id; must be the served one if given."
    )
    prompt: str | list[str] | list[JSONInt] | list[list[JSONInt]] = Field(
        description="Text, a list of texts, token ids, or a list of token id lists."
    )
    stop: StopField = None
    max_tokens: JSONInt | None = Field(
        default=None,
        ge=0,
        description="Most tokens to generate (default 16); 0, with echo, scores the prompt alone.",
    )
    logprobs: JSONInt | None = Field(
        default=None,
        ge=0,
        description="Return the log probabilities of this many top tokens per token.",
    )
    echo: bool = Field(
        default=False,
        description="Put the prompt before the completion text; with logprobs, its tokens "
        "are scored too (the first has null).",
    )
    stream: bool = Field(default=False, description="Stream Server-Sent Events ending in [DONE].")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    user: str | None = Field(default=None, description="End-user id; accepted and ignored.")
    suffix: str | None = Field(default=None, description="Not supported (must be empty).")
    best_of: JSONInt | None = Field(default=None, description="Not supported beyond n.")
    logit_bias: LogitBias = None
    response_format: ResponseFormat = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        _refuse_unsupported({"suffix": self.suffix}, ("suffix",))
        check_structured(self.response_format, self.min_tokens)
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        if isinstance(self.prompt, list) and not 0 < len(self.prompt) <= MAX_PROMPTS:
            raise ValueError(f"prompt must hold 1 to {MAX_PROMPTS} items")
        if len(self.stop_list) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings")
        return self

    @property
    def stop_list(self) -> list[str]:
        return stop_list_of(self.stop)

    @property
    def include_usage(self) -> bool:
        return usage_requested(self.stream_options)

    @property
    def scores_prompt_only(self) -> bool:
        """max_tokens 0 (with echo): the prompt is scored and nothing generated is shown."""
        return self.max_tokens == 0

    def max_tokens_or(self, default: int) -> int:
        if self.scores_prompt_only:
            return 1  # the engine makes one token, which is not shown
        return super().max_tokens_or(default)

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprobs_count(self) -> int | None:
        return self.logprobs if self.echo else None  # the echoed prompt's tokens are scored too

    @property
    def logit_bias_by_id(self) -> dict[int, float]:
        return bias_by_token_id(self.logit_bias)

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each one a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    # null for an echoed prompt's first token, which nothing predicts
    token_logprobs: list[Logprob | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, Logprob] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = Field(
        default=None, description="stop or length; null while streaming."
    )


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --- /v1/caption and /v1/qa (multipart) ------------------------------------------------------


class VisionForm(SamplingFields):
    image: UploadFile = Field(description="The image: PNG, JPEG, WebP, BMP or GIF (first frame).")
    model: str | None = Field(
        default=None, description="Model id; must be the served one if given."
    )
    stop: list[str] | None = Field(
        default=None,
        max_length=MAX_STOP_STRINGS,
        description="Strings that end generation (repeatable).",
    )
    stream: bool = Field(default=False, description="Stream Server-Sent Events ending in [DONE].")
    stream_include_usage: bool = Field(
        default=False,
        description="With stream: send a last chunk before [DONE] with no choices and the token "
        "usage (stream_options.include_usage of the JSON APIs).",
    )

    @property
    def stop_list(self) -> list[str]:
        return self.stop or []


class CaptionForm(VisionForm):
    prompt: str | None = Field(default=None, description="Instruction. Default: the model's own.")


class QAForm(VisionForm):
    question: str = Field(min_length=1, description="The question about the image.")


# --- /v1/models, /health, /ready --------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mmgpt"
    max_model_len: int | None = None
    root: str | None = None  # the served model an id stands for: itself, or an adapter's base
    parent: str | None = None  # a LoRA adapter's base model; None for the base itself


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(BaseModel):
    status: str = Field(description="ok, loading, draining or failed.")
    detail: str | None = None
