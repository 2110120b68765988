"""Per-request state and the plain dataclasses that cross the engine boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    """How to sample one request. Defaults follow the OpenAI API."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top alternatives per sampled token; None: no logprobs
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image: pixel values ready for the vision tower."""

    pixel_values: Any  # numpy float32 array [3, H, W]
    content_hash: str  # hash of the decoded pixels; keys the image and prefix caches


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top_logprobs: dict[str, float]  # token text -> logprob, the top alternatives


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic()) for latency metrics; None until reached."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """One increment of one sample of a request, as streamed to the caller.

    `text` and `token_ids` hold only what is new since the previous output of
    the same `index`. `finish_reason` is set on the last output of a sample:
    "stop", "length", "abort" or "error".
    """

    request_id: str
    index: int  # which of the n samples
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generated_tokens: int = 0  # total so far for this sample
    error: str | None = None  # set when finish_reason == "error"
    metrics: RequestMetrics | None = None  # set on the final output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
