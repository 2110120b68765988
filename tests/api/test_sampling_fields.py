"""Requests into the engine's SamplingParams: the checkpoint's defaults for unset fields, and
what each request model's own fields mean (echo, max_tokens 0, logit_bias, stream usage)."""

from __future__ import annotations

import io

from fastapi import UploadFile

from app.chat_schemas import ChatCompletionRequest
from app.engine.sequence import SamplingParams
from app.sampling_fields import SamplingDefaults
from app.schemas import CaptionForm, CompletionRequest


def _upload() -> UploadFile:
    return UploadFile(io.BytesIO(b""), filename="scene.png")


CHECKPOINT = SamplingDefaults.of({"temperature": 0.7, "top_p": 0.9, "top_k": None}, 64)
CHAT = [{"role": "user", "content": "x"}]


def test_sampling_params_take_unset_fields_from_the_checkpoint() -> None:
    params = CompletionRequest(prompt="x", top_p=0.5).to_sampling_params(CHECKPOINT, 16)
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.5, SamplingParams.top_k)
    assert params.max_tokens == 16 and params.logprobs is None and params.prompt_logprobs is None
    greedy = SamplingDefaults.of({"do_sample": False, "temperature": 0.7}, 64)
    assert CompletionRequest(prompt="x").to_sampling_params(greedy, 16).temperature == 0.0
    warm = CompletionRequest(prompt="x", temperature=1.2)
    assert warm.to_sampling_params(greedy, 16).temperature == 1.2


def test_completion_sampling_params() -> None:
    request = CompletionRequest.model_validate(
        {
            "prompt": "x", "n": 2, "seed": 5, "stop": "end", "logprobs": 3, "echo": True,
            "logit_bias": {"7": 2.5, "8": 0}, "min_tokens": 1, "max_tokens": 9,
        }
    )  # fmt: skip
    params = request.to_sampling_params(CHECKPOINT, 16, grammar="g")
    assert (params.n, params.seed, params.stop, params.max_tokens) == (2, 5, ["end"], 9)
    assert (params.logprobs, params.prompt_logprobs, params.min_tokens) == (3, 3, 1)
    assert params.logit_bias == {7: 2.5} and params.grammar == "g"  # a zero bias changes nothing
    scored = CompletionRequest(prompt="x", max_tokens=0, echo=True)
    assert scored.scores_prompt_only and scored.to_sampling_params(CHECKPOINT, 16).max_tokens == 1


def test_chat_and_form_sampling_params_default_to_the_rest_of_the_context() -> None:
    rest = CHECKPOINT.rest_of_context(40)
    chat = ChatCompletionRequest.model_validate({"messages": CHAT, "stop": ["a", "b"]})
    assert rest == 24 and chat.to_sampling_params(CHECKPOINT, rest).max_tokens == 24
    assert chat.to_sampling_params(CHECKPOINT, rest).stop == ["a", "b"]
    alias = ChatCompletionRequest.model_validate({"messages": CHAT, "max_completion_tokens": 5})
    assert alias.to_sampling_params(CHECKPOINT, rest).max_tokens == 5
    form = CaptionForm.model_validate({"image": _upload(), "stop": ["."], "max_tokens": 3})
    form_params = form.to_sampling_params(CHECKPOINT, rest)
    assert form_params.max_tokens == 3 and form_params.stop == ["."] and not form_params.logit_bias
    assert CHECKPOINT.rest_of_context(64) == CHECKPOINT.rest_of_context(90) == 1


def test_usage_is_streamed_only_when_asked_for() -> None:
    assert not CompletionRequest(prompt="x").include_usage
    asked = {"prompt": "x", "stream_options": {"include_usage": True}}
    assert CompletionRequest.model_validate(asked).include_usage
    chat = ChatCompletionRequest.model_validate({"messages": CHAT, "stream_options": {}})
    assert not chat.include_usage
    assert not CaptionForm.model_validate({"image": _upload()}).stream_include_usage
