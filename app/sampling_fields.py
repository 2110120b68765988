"""The sampling fields every generating request shares, and the one place a request becomes
the engine's SamplingParams: `SamplingFields.to_sampling_params`. Each request model (JSON
or form) says what its own fields mean through the properties that method reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.engine.sequence import SamplingParams

MAX_N = 128
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _integral_float_to_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer field of a request: JSON Schema counts 5.0 as the integer 5, and so do we.
JSONInt = Annotated[int, BeforeValidator(_integral_float_to_int)]


# The sampling fields a checkpoint's generation_config may set; a request's own value wins.
MODEL_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request leaves unset: the checkpoint's generation_config (then SamplingParams'
    own defaults), and the context that max_tokens defaults to the rest of."""

    model_defaults: dict[str, Any]  # those of MODEL_DEFAULT_FIELDS the checkpoint sets
    max_model_len: int

    @classmethod
    def of(cls, generation_config: Mapping[str, Any], max_model_len: int) -> SamplingDefaults:
        chosen = {
            key: generation_config[key]
            for key in MODEL_DEFAULT_FIELDS
            if generation_config.get(key) is not None
        }
        if generation_config.get("do_sample") is False:
            chosen["temperature"] = 0.0  # the checkpoint asks for greedy decoding
        return cls(chosen, max_model_len)

    def rest_of_context(self, num_prompt_tokens: int) -> int:
        """max_tokens for a request that sets none: what the prompt leaves of the context, at
        least 1 (so that the engine refuses a prompt that fills it, saying both numbers)."""
        return max(1, self.max_model_len - num_prompt_tokens)


class SamplingFields(BaseModel):
    """Sampling controls shared by every generating endpoint. Unset: the model's defaults.

    `to_sampling_params` is the one place a request becomes the engine's SamplingParams;
    each request model says what its own fields mean through the properties below it.
    """

    model_config = ConfigDict(extra="ignore")

    max_tokens: JSONInt | None = Field(
        default=None,
        ge=1,
        description="Most tokens to generate. Default: 16 for completions, "
        "the rest of the context otherwise.",
    )
    temperature: float | None = Field(
        default=None,
        ge=0,
        le=2,
        description="Sampling temperature; 0 is greedy. "
        "Default: the model's generation_config, else 1.",
    )
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: JSONInt | None = Field(
        default=None, ge=-1, description="Sample from the k best tokens; 0 or -1: all."
    )
    min_p: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Drop tokens below min_p times the best token's probability.",
    )
    n: JSONInt = Field(
        default=1, ge=1, le=MAX_N, description="Completions to generate for each prompt."
    )
    seed: JSONInt | None = Field(
        default=None, ge=SEED_MIN, le=SEED_MAX, description="Makes sampling reproducible."
    )
    presence_penalty: float = Field(
        default=0.0, ge=-2, le=2, description="Penalty on tokens seen so far."
    )
    frequency_penalty: float = Field(
        default=0.0, ge=-2, le=2, description="Penalty proportional to how often a token was seen."
    )
    repetition_penalty: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="Multiplicative penalty on repeated tokens; 1 is none.",
    )
    ignore_eos: bool = Field(
        default=False, description="Keep generating past the end-of-text token."
    )
    min_tokens: JSONInt = Field(
        default=0, ge=0, description="Tokens to generate before EOS or stop may end."
    )

    def to_sampling_params(
        self, defaults: SamplingDefaults, default_max_tokens: int, grammar: str | None = None
    ) -> SamplingParams:
        """The engine's parameters: what the request sets, the rest from `defaults`. `grammar`
        (compiled by the caller, off the event loop) holds the output to a JSON schema."""
        chosen = {
            key: getattr(self, key)
            for key in MODEL_DEFAULT_FIELDS
            if getattr(self, key) is not None
        }
        return SamplingParams(
            **{**defaults.model_defaults, **chosen},
            n=self.n,
            max_tokens=self.max_tokens_or(default_max_tokens),
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stop_list,
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            logprobs=self.logprobs_count,
            prompt_logprobs=self.prompt_logprobs_count,
            logit_bias=self.logit_bias_by_id,
            grammar=grammar,
        )

    def max_tokens_or(self, default: int) -> int:
        return default if self.max_tokens is None else self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return []

    @property
    def logprobs_count(self) -> int | None:
        """Top alternatives per sampled token; None: no logprobs."""
        return None

    @property
    def prompt_logprobs_count(self) -> int | None:
        """Top alternatives per prompt token; None: the prompt is not scored."""
        return None

    @property
    def logit_bias_by_id(self) -> dict[int, float]:
        return {}
