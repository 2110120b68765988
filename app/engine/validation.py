"""The one home of every rule that needs the model or the engine's limits.

The engine refuses a request that breaks one (InvalidRequestError, with the request field at
fault as `param`), whoever submitted it; the service maps the refusal to a 400. Rules about a
request's shape alone stay on the service's schemas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate

from app.engine.errors import InvalidRequestError
from app.engine.sequence import ImageInput, ImageSpan, SamplingParams
from models.base import ModelInfo

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


def validate_params(params: SamplingParams, info: ModelInfo, max_logprobs: int) -> None:
    _check(params.n >= 1, "n must be at least 1", "n")
    _check(params.max_tokens >= 1, "max_tokens must be at least 1", "max_tokens")
    _check_min_tokens(params)
    _check_ranges(params)
    _check_logprobs(params, max_logprobs)
    _check(all(isinstance(s, str) for s in params.stop), "stop must be strings", "stop")
    vocab = info.vocab_size
    _check(
        all(0 <= t < vocab for t in params.stop_token_ids),
        f"stop_token_ids must lie in [0, {vocab}).",
        "stop_token_ids",
    )
    _check(
        all(0 <= t < vocab for t in params.logit_bias),
        f"logit_bias token ids must lie in [0, {vocab}).",
        "logit_bias",
    )


def _check_min_tokens(params: SamplingParams) -> None:
    _check(params.min_tokens >= 0, "min_tokens must be at least 0", "min_tokens")
    _check(
        params.min_tokens <= params.max_tokens,
        f"min_tokens may not exceed max_tokens ({params.max_tokens}).",
        "min_tokens",
    )


def _check_ranges(params: SamplingParams) -> None:
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


def _check_logprobs(params: SamplingParams, max_logprobs: int) -> None:
    """Top alternatives, of sampled and of prompt tokens alike, up to the server's limit."""
    for count in (params.logprobs, params.prompt_logprobs):
        if count is not None:
            _check(count >= 0, "logprobs must be at least 0", "logprobs")
            _check(count <= max_logprobs, f"logprobs may be at most {max_logprobs}.", "logprobs")


def validate_prompt(prompt_token_ids: list[int], info: ModelInfo) -> None:
    _check(len(prompt_token_ids) > 0, "The prompt is empty.", "prompt")
    vocab = info.vocab_size
    _check(
        all(0 <= t < vocab for t in prompt_token_ids),
        f"Prompt token ids must lie in [0, {vocab}).",
        "prompt",
    )


def validate_length(
    num_prompt_tokens: int, max_tokens: int, max_model_len: int, capacity_tokens: int
) -> None:
    """A request must fit the context and, alone, the whole KV cache."""
    validate_context(num_prompt_tokens, max_tokens, max_model_len)
    total = num_prompt_tokens + max_tokens
    if total > capacity_tokens:
        raise InvalidRequestError(
            f"the KV cache holds {capacity_tokens} tokens, but the request needs {total} "
            f"({num_prompt_tokens} in the prompt + {max_tokens} max_tokens)",
            "max_tokens",
        )


def validate_context(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """The prompt and max_tokens fit the model's context; the message says both numbers."""
    total = num_prompt_tokens + max_tokens
    if total <= max_model_len:
        return
    advice = (
        "The prompt alone leaves no room to generate; shorten it."
        if num_prompt_tokens >= max_model_len
        else "Shorten the prompt or lower max_tokens."
    )
    raise InvalidRequestError(
        f"The model's context is {max_model_len} tokens, but {total} were requested: "
        f"{num_prompt_tokens} in the prompt and {max_tokens} for the completion (max_tokens). "
        + advice,
        "max_tokens",
        code=CONTEXT_LENGTH_EXCEEDED,
    )


def image_spans(
    prompt_token_ids: list[int], images: Sequence[ImageInput], info: ModelInfo
) -> tuple[ImageSpan, ...]:
    """Where each image's image tokens sit, checking their count, and that they are
    consecutive unless the image's prompt text puts tags between them (then the span
    runs from its first image token to its last)."""
    if not info.is_multimodal:
        _check(not images, "this model takes no images", "images")
        return ()
    lengths = [image.num_tokens or info.image_seq_length for image in images]
    positions = [i for i, t in enumerate(prompt_token_ids) if t == info.image_token_id]
    if len(positions) != sum(lengths):
        raise InvalidRequestError(
            f"The prompt holds {len(positions)} image tokens, but its {len(images)} image(s) "
            f"need {sum(lengths)}; the image token may appear only where an image is, not in "
            "text.",
            "prompt",
        )
    spans, first = [], 0
    for k, (image, length) in enumerate(zip(images, lengths, strict=True)):
        mine = positions[first : first + length]
        start, end = mine[0], mine[-1] + 1
        if image.prompt_text:
            spans.append(ImageSpan(start, end - start, image, _rows_before(mine, start, end)))
        else:
            _check(
                end - start == length, f"image {k}'s {length} tokens are not consecutive", "prompt"
            )
            spans.append(ImageSpan(start, length, image))
        first += length
    return tuple(spans)


def _rows_before(image_positions: list[int], start: int, end: int) -> tuple[int, ...]:
    """For each offset 0..end-start of a span, how many of its image tokens come before it."""
    marks = set(image_positions)
    return tuple(accumulate((int(p in marks) for p in range(start, end)), initial=0))


def validate_image_tokens(spans: Sequence[ImageSpan], max_image_tokens: int) -> None:
    """The server's cap on a request's image tokens (0: none), before any work is done."""
    check_image_token_cap(sum(span.length for span in spans), max_image_tokens)


def check_image_token_cap(total: int, max_image_tokens: int) -> None:
    """Refuses `total` image tokens over the cap (0: none); also checked from image headers."""
    if max_image_tokens and total > max_image_tokens:
        raise InvalidRequestError(
            f"The request's images take {total} tokens; the server allows at most "
            f"{max_image_tokens} image tokens per request. Send smaller images, fewer images "
            'or detail "low".',
            "messages",
        )


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise InvalidRequestError(message, param)
