"""Request models: prompt shapes, and unsupported options refused rather than ignored."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.chat_schemas import ChatCompletionRequest
from app.schemas import (
    MAX_LOGIT_BIAS,
    MAX_STOP_STRINGS,
    CompletionRequest,
    response_schema,
)


def test_prompt_shapes() -> None:
    assert CompletionRequest(prompt="hi").prompts() == ["hi"]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert CompletionRequest(prompt=[[1, 2], [3]]).prompts() == [[1, 2], [3]]
    assert CompletionRequest(prompt="x", stop="END").stop_list == ["END"]


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": []},
        {"prompt": "x", "suffix": "tail"},
        {"prompt": "x", "logit_bias": {"five": 10}},
        {"prompt": "x", "logit_bias": {"05": 10}},
        {"prompt": "x", "logit_bias": {"-5": 10}},
        {"prompt": "x", "logit_bias": {"٣": 10}},  # a decimal digit, but not ASCII
        {"prompt": "x", "logit_bias": {"1" * 11: 10}},
        {"prompt": "x", "logit_bias": {"5": 100.5}},
        {"prompt": "x", "logit_bias": {"5": float("nan")}},
        {"prompt": "x", "logit_bias": {"5": "10"}},
        {"prompt": "x", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}},
        {"prompt": "x", "best_of": 3},
        {"prompt": "x", "stop": ["s"] * (MAX_STOP_STRINGS + 1)},
        {"prompt": "x", "n": 0},
        {"prompt": "x", "temperature": -1},
        {"prompt": "x", "seed": 2**64},
        {"prompt": "x", "max_tokens": -1},
        {"prompt": {"nested": ["deep"]}},
    ],
)
def test_completion_requests_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(fields)


def test_logit_bias_takes_token_ids_and_biases_in_range() -> None:
    bias = {"0": -100, "5": 2.5, str(MAX_LOGIT_BIAS * 99): 100}
    assert CompletionRequest.model_validate({"prompt": "x", "logit_bias": bias}).logit_bias == bias
    chat = {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"7": -1}}
    assert ChatCompletionRequest.model_validate(chat).logit_bias == {"7": -1}
    chat["logit_bias"] = {"7": 101}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(chat)


def test_response_formats_name_the_schema_to_follow() -> None:
    def schema_of(response_format: dict[str, Any]) -> dict[str, Any] | None:
        fields = {"prompt": "x", "response_format": response_format}
        return response_schema(CompletionRequest.model_validate(fields).response_format)

    assert schema_of({"type": "text"}) is None
    assert schema_of({"type": "json_object"}) == {"type": "object"}
    schema = {"type": "array", "items": {"type": "integer"}}
    assert schema_of({"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}) == (
        schema
    )
    assert schema_of({"type": "json_schema", "json_schema": {"name": "any"}}) == {}


def test_unknown_fields_are_ignored() -> None:
    request = CompletionRequest.model_validate({"prompt": "x", "user": "u", "made_up": 1})
    assert request.prompts() == ["x"]


def test_chat_requests() -> None:
    message: dict[str, Any] = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:,"}}],
    }
    request = ChatCompletionRequest.model_validate(
        {"messages": [message], "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 2}
    )
    assert request.max_tokens_or(100) == 9 and request.logprobs_count == 2
    bad_requests: list[dict[str, Any]] = [
        {"messages": []},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
        {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema"},
        },
        {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"},
            "min_tokens": 2,
        },
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    ]
    for bad in bad_requests:
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(bad)
