"""Per-request state and the plain dataclasses that cross the engine boundary."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    # top alternatives per prompt token, whose own logprob is always given; None: none
    prompt_logprobs: int | None = None
    grammar: str | None = None  # an llguidance grammar the output must match (response_format)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image: its processor's tensors and the placeholder tokens it becomes."""

    # numpy float32: [3, H, W] for a fixed-size tower, [patches, C*T*P*P] for Qwen-VL
    pixel_values: Any
    content_hash: str  # hash of the decoded pixels; keys the image and prefix caches
    num_tokens: int = 0  # image tokens in the prompt; 0: the model's fixed count
    extra: Mapping[str, Any] = field(default_factory=dict)  # e.g. image_grid_thw [3]
    # the text its placeholder becomes where the family writes tags between its image tokens
    # (SmolVLM's tiles); "": num_tokens image tokens in a row
    prompt_text: str = ""

    @property
    def placeholder(self) -> int | str:
        """What the prompt builder expands the image's placeholder into."""
        return self.prompt_text or self.num_tokens

    def tensors(self) -> dict[str, Any]:
        """Every tensor the processor made, by its name, as the model's tower takes them."""
        return {"pixel_values": self.pixel_values, **self.extra}


@dataclass(frozen=True)
class AdapterRef:
    """The LoRA adapter a request runs with (app/engine/adapters.py)."""

    name: str
    slot: int  # its slot in the model's adapter registry (models/lora)
    load_id: int  # unique per load: part of the prefix and image cache keys
    adapts_images: bool  # it changes image embeddings (it adapts the projector)

    @property
    def cache_salt(self) -> bytes:
        return b"lora:%d" % self.load_id


@dataclass(frozen=True)
class RopePositions:
    """Multi-section positions of a prompt (M-RoPE), fixed when the prompt is built.

    A token p past the prompt sits at p + offset in every section, so decodes, forks
    and a recomputed (preempted) sequence need nothing else.
    """

    prompt: Any  # numpy int64 [sections, num_prompt_tokens]
    offset: int

    def columns(self, start: int, end: int) -> Any:
        """Positions [sections, end - start] of tokens start..end-1."""
        num_prompt = self.prompt.shape[1]
        if end <= num_prompt:
            return self.prompt[:, start:end]
        after = np.arange(max(start, num_prompt), end) + self.offset
        tail = np.broadcast_to(after, (self.prompt.shape[0], after.shape[0]))
        return np.concatenate((self.prompt[:, start:num_prompt], tail), axis=1)


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
    # with SamplingParams.prompt_logprobs, on a sample's first output: each prompt token
    # after the first, given the ones before it
    prompt_logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generated_tokens: int = 0  # total so far for this sample
    error: str | None = None  # set when finish_reason == "error"
    metrics: RequestMetrics | None = None  # set on the final output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


GREEDY_TEMPERATURE = 1e-5  # a temperature below this samples greedily (argmax)


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # queued for (re)admission; holds no KV blocks
    RUNNING = enum.auto()  # holds KV blocks; prefilling or decoding
    FINISHED = enum.auto()


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's tokens sit in a prompt."""

    start: int  # position of the image's first token
    length: int  # the prompt tokens from its first image token to its last, tags included
    image: ImageInput
    # where tags sit between its image tokens: the image tokens before each offset of the
    # span (length + 1 entries); None: every token of the span is an image token
    rows_before: tuple[int, ...] | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    def rows(self, lo: int, hi: int) -> tuple[int, int]:
        """The embedding rows of the image tokens at offsets lo..hi-1 of the span."""
        if self.rows_before is None:
            return lo, hi
        return self.rows_before[lo], self.rows_before[hi]


class Sequence:
    """One sample of one request: its tokens, progress and KV blocks.

    Owned by the engine's loop thread. `num_computed_tokens` counts tokens whose
    keys and values sit in the cache; the next step computes the rest. A
    request with n > 1 samples starts as one sequence whose `pending_forks`
    are the other samples: they share its prompt blocks and are forked off
    when the prompt is done, each with the token sampled for it.
    """

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        image_spans: tuple[ImageSpan, ...] = (),
        rope_positions: RopePositions | None = None,
        adapter: AdapterRef | None = None,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.image_spans = image_spans
        self.rope_positions = rope_positions  # None: positions are 0, 1, 2, ...
        self.adapter = adapter  # None: the base model
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.was_admitted = False
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chain hashes of the leading full blocks (memo)
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.pending_forks: list[Sequence] = []
        # with params.prompt_logprobs: those of prompt tokens 1, 2, ... computed so far
        self.prompt_logprobs: list[TokenLogprob] = []
        self.matcher: Any = None  # with params.grammar: where this sample is in it
        self.finish_reason: str | None = None
        self.generator: Any = None  # the sampler's per-sequence random state, when seeded
        self.is_greedy = params.temperature < GREEDY_TEMPERATURE
        self.has_penalties = (
            params.repetition_penalty != 1.0
            or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
        )
        # Nothing for the sampler to do but an argmax (its fast path).
        self.is_plain_greedy = (
            self.is_greedy
            and not self.has_penalties
            and not params.logit_bias
            and params.grammar is None
            and params.logprobs is None
            and params.min_tokens == 0
        )

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id}, {self.request_id!r}#{self.index}, {self.status.name}, "
            f"{self.num_computed_tokens}/{self.num_tokens})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether some prompt token's logprob is still to be computed (so no prompt token
        may come from the prefix cache, which keeps K/V but no logits)."""
        wanted = self.params.prompt_logprobs is not None
        return wanted and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def is_decoding(self) -> bool:
        return len(self.token_ids) - self.num_computed_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def group_size(self) -> int:
        """Sequences this one stands for in the running cap: itself plus unforked samples."""
        return 1 + len(self.pending_forks)

    @property
    def cache_salt(self) -> bytes:
        """Starts the prefix-cache hash chain: blocks are shared only under one adapter."""
        return b"" if self.adapter is None else self.adapter.cache_salt

    def num_blocks_needed(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size

    def images_in(self, start: int, end: int) -> list[ImageSpan]:
        """The images with at least one token in positions [start, end)."""
        return [span for span in self.image_spans if span.start < end and span.end > start]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def stop_reason_for(self, token_id: int, eos_token_ids: tuple[int, ...]) -> str | None:
        """Why the just-appended token ends this sample, if it does (stop strings aside)."""
        params = self.params
        num_output = len(self.token_ids) - self.num_prompt_tokens
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in eos_token_ids:
                return "stop"
            if token_id in params.stop_token_ids:
                return "stop"
        if num_output >= params.max_tokens:
            return "length"
        return None
