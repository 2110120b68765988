"""The stats the engine emits: its state, each step, each finished request.

The engine knows nothing of Prometheus: it hands a `StatsUpdate` to the sink it was
given, and the service's recorder turns updates into series.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine's state after a step or an abort; the counters are cumulative."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # blocks held by live requests / all blocks
    num_blocks: int
    num_free_blocks: int
    decode_mirror_bytes: int  # 0 where there is no decode mirror
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # prompt tokens found
    image_cache_queries: int
    image_cache_hits: int
    num_preemptions: int
    num_steps: int
    last_step_end: float  # time.monotonic() of the last step's end; 0 before the first
    # per LoRA adapter holding a slot: (name, running sequences, waiting sequences)
    adapter_requests: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class StepStats:
    duration: float  # seconds: schedule, run, update
    num_batched_tokens: int  # tokens the model computed
    num_generated_tokens: int  # tokens handed to callers
    vision_encoder_seconds: float = 0.0  # the vision tower's share; 0 when no image was new


@dataclass(frozen=True, slots=True)
class FinishedRequestStats:
    """One request once its last sample has ended (finished, aborted or failed).

    A span is None when the request never reached its start: never scheduled, no token.
    """

    num_prompt_tokens: int
    num_generation_tokens: int  # over all its samples
    e2e_latency: float  # arrival to the end
    queue_time: float | None  # arrival to first scheduled
    time_to_first_token: float | None  # arrival to first token
    prefill_time: float | None  # first scheduled to first token
    decode_time: float | None  # first token to last token
    token_gaps: tuple[float, ...]  # seconds between consecutive output tokens
    num_image_tokens: int = 0  # placeholder tokens of its images in the prompt


@dataclass(frozen=True, slots=True)
class StatsUpdate:
    """What changed: the state after it, the step if one ran, the requests that ended."""

    engine: EngineStats
    step: StepStats | None = None  # None: an abort, no step
    finished: tuple[FinishedRequestStats, ...] = ()


# Called on the engine's loop thread, inside the step: it must be quick and must not raise.
StatsSink = Callable[[StatsUpdate], None]


def ignore_stats(update: StatsUpdate) -> None:
    """The sink of an engine whose stats nobody records."""
