"""Checks a request must pass before the engine accepts it. Raises InvalidRequestError."""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq

from app.engine.errors import InvalidRequestError
from app.engine.sequence import ImageInput, ImageSpan, SamplingParams
from models.base import ModelInfo


def validate_params(params: SamplingParams, info: ModelInfo, max_logprobs: int) -> None:
    _check(params.n >= 1, "n must be at least 1", "n")
    _check(params.max_tokens >= 1, "max_tokens must be at least 1", "max_tokens")
    _check(
        0 <= params.min_tokens <= params.max_tokens,
        "min_tokens must be in [0, max_tokens]",
        "min_tokens",
    )
    _check(
        _finite(params.temperature) and params.temperature >= 0.0,
        "temperature must be a finite number >= 0",
        "temperature",
    )
    _check(_finite(params.top_p) and 0.0 < params.top_p <= 1.0, "top_p must be in (0, 1]", "top_p")
    _check(params.top_k >= -1, "top_k must be -1, 0 (disabled) or positive", "top_k")
    _check(_finite(params.min_p) and 0.0 <= params.min_p <= 1.0, "min_p must be in [0, 1]", "min_p")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        _check(_finite(value) and -2.0 <= value <= 2.0, f"{name} must be in [-2, 2]", name)
    _check(
        _finite(params.repetition_penalty) and params.repetition_penalty > 0.0,
        "repetition_penalty must be > 0",
        "repetition_penalty",
    )
    if params.logprobs is not None:
        _check(
            0 <= params.logprobs <= max_logprobs,
            f"logprobs must be in [0, {max_logprobs}]",
            "logprobs",
        )
    _check(all(isinstance(s, str) for s in params.stop), "stop must be strings", "stop")
    _check(
        all(0 <= t < info.vocab_size for t in params.stop_token_ids),
        f"stop_token_ids must be in [0, {info.vocab_size})",
        "stop_token_ids",
    )


def validate_prompt(prompt_token_ids: Seq[int], info: ModelInfo) -> None:
    _check(len(prompt_token_ids) > 0, "the prompt is empty", "prompt")
    vocab = info.vocab_size
    _check(
        all(0 <= t < vocab for t in prompt_token_ids),
        f"prompt token ids must be in [0, {vocab})",
        "prompt",
    )


def validate_length(
    num_prompt_tokens: int, max_tokens: int, max_model_len: int, capacity_tokens: int
) -> None:
    """A request must fit the context and, alone, the whole KV cache."""
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise InvalidRequestError(
            f"this model's maximum context length is {max_model_len} tokens, but the request "
            f"asks for {total} ({num_prompt_tokens} in the prompt + {max_tokens} max_tokens)",
            "max_tokens",
        )
    if total > capacity_tokens:
        raise InvalidRequestError(
            f"the KV cache holds {capacity_tokens} tokens, but the request needs {total} "
            f"({num_prompt_tokens} in the prompt + {max_tokens} max_tokens)",
            "max_tokens",
        )


def image_spans(
    prompt_token_ids: Seq[int], images: Seq[ImageInput], info: ModelInfo
) -> tuple[ImageSpan, ...]:
    """Where each image's run of image tokens sits, checking counts and contiguity."""
    if not info.is_multimodal:
        _check(not images, "this model takes no images", "images")
        return ()
    length = info.image_seq_length
    positions = [i for i, t in enumerate(prompt_token_ids) if t == info.image_token_id]
    if len(positions) != len(images) * length:
        raise InvalidRequestError(
            f"the prompt holds {len(positions)} image tokens, but {len(images)} image(s) of "
            f"{length} tokens each need {len(images) * length}",
            "images",
        )
    spans = []
    for k, image in enumerate(images):
        start = positions[k * length]
        _check(
            positions[k * length + length - 1] == start + length - 1,
            f"image {k}'s {length} tokens are not consecutive",
            "images",
        )
        spans.append(ImageSpan(start, length, image))
    return tuple(spans)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise InvalidRequestError(message, param)
