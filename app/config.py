"""The one place configuration is read: `Settings` (env prefix MMGPT_), turned into EngineConfig.

Every field is also a flag of `mmgpt serve` (see app/cli.py), so the table in the
README, the environment and the command line always agree.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.engine.config import Dtype, EngineConfig, Quantization

DEFAULT_MODEL_NAME = "mmgpt-scenes"
MB = 1_000_000


class ModelPathError(ValueError):
    """The configured checkpoint folder does not exist or is not a checkpoint."""


class Settings(BaseSettings):
    """Service settings; each one is read from MMGPT_<NAME> or `mmgpt serve --<name>`."""

    model_config = SettingsConfigDict(env_prefix="MMGPT_", extra="forbid", frozen=True)

    # The model and the engine: EngineConfig's fields, by name, with its defaults.
    model: str | None = Field(
        default=None,
        description="Checkpoint folder in Hugging Face format, or a GGUF file (or a folder "
        "holding one). Default: the shipped "
        f"models/checkpoints/{DEFAULT_MODEL_NAME}.",
    )
    served_model_name: str | None = Field(
        default=None,
        description="Model id clients must name. Default: the checkpoint folder's name.",
    )
    device: str = Field(
        default=EngineConfig.device, description="auto (cuda when available, else cpu), cpu, cuda."
    )
    dtype: Dtype = Field(default=EngineConfig.dtype, description="Weights and KV cache dtype.")
    quantization: Quantization = Field(
        default=EngineConfig.quantization,
        description="int8: the decoder's matrices (on a CPU the output layer too) as "
        "per-channel int8; on a CPU activations go int8 per row, elsewhere they stay in dtype.",
    )
    block_size: int = Field(
        default=EngineConfig.block_size, ge=1, description="Tokens per KV cache block."
    )
    max_num_seqs: int = Field(
        default=EngineConfig.max_num_seqs, ge=1, description="Most sequences in one engine step."
    )
    max_num_batched_tokens: int = Field(
        default=EngineConfig.max_num_batched_tokens,
        ge=1,
        description="Most tokens (decodes + prefill chunks) in one engine step.",
    )
    max_model_len: int | None = Field(
        default=EngineConfig.max_model_len,
        ge=1,
        description="Context length. Default: the checkpoint's own.",
    )
    kv_cache_bytes: int | None = Field(
        default=EngineConfig.kv_cache_bytes,
        ge=1,
        description="KV cache size. Default: a CPU default or a GPU memory fraction.",
    )
    gpu_memory_utilization: float = Field(
        default=EngineConfig.gpu_memory_utilization,
        gt=0,
        le=1,
        description="Fraction of GPU memory the engine may use.",
    )
    max_waiting_requests: int = Field(
        default=EngineConfig.max_waiting_requests,
        ge=0,
        description="Waiting-queue length beyond which requests get 503 + Retry-After.",
    )
    enable_prefix_caching: bool = Field(
        default=EngineConfig.enable_prefix_caching, description="Share KV blocks of equal prefixes."
    )
    image_cache_size: int = Field(
        default=EngineConfig.image_cache_size,
        ge=0,
        description="Image embeddings kept, by content.",
    )
    max_image_tokens_per_request: int = Field(
        default=EngineConfig.max_image_tokens_per_request,
        ge=0,
        description="Most image tokens one request may hold (0: only the context limits them).",
    )
    num_threads: int | None = Field(
        default=EngineConfig.num_threads,
        ge=1,
        description="Most torch threads a CPU step uses (small steps use one). Default: all cores.",
    )
    max_logprobs: int = Field(
        default=EngineConfig.max_logprobs,
        ge=0,
        description="Most top logprobs a request may ask for.",
    )
    stream_interval_ms: float = Field(
        default=EngineConfig.stream_interval_ms,
        ge=0,
        description=(
            "A stream sends at most once per this many milliseconds: the tokens made in "
            "between go out together, as one event. Only streams faster than this are "
            "joined; 0 sends every token as it comes."
        ),
    )
    seed: int = Field(
        default=EngineConfig.seed, description="Seed of the engine's default random generator."
    )
    warm_up: bool = Field(
        default=EngineConfig.warm_up,
        description="Run one full-size step before serving, so the first requests are not slow.",
    )
    decode_mirror: bool = Field(
        default=EngineConfig.decode_mirror,
        description=(
            "On the CPU, keep the decoding sequences' keys and values also in one contiguous "
            "tensor per layer, so that decode attention reads them in place instead of "
            "gathering their blocks each step. Uses up to the KV cache's memory again."
        ),
    )

    # LoRA adapters served beside the model (models/lora).
    lora_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Adapters to serve, NAME=PATH each (PEFT folders, e.g. from `mmgpt "
        "finetune`); requests name one in `model`. Comma-separated in the environment.",
    )
    max_loras: int = Field(
        default=EngineConfig.max_loras,
        ge=1,
        description="Adapter slots held in memory when adapters are served.",
    )
    max_lora_rank: int = Field(
        default=EngineConfig.max_lora_rank, ge=1, description="Highest adapter rank accepted."
    )
    allow_runtime_lora: bool = Field(
        default=False,
        description="Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter; adapters "
        "are read only from inside --lora-dirs.",
    )
    lora_dirs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated folders that runtime-loaded adapters must lie in.",
    )

    # The HTTP server.
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Log level."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys. When set, /v1/* need 'Authorization: Bearer KEY'.",
    )
    drain_timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds in-flight requests may take to finish after SIGTERM.",
    )

    # Limits on what a request may carry.
    max_body_bytes: int = Field(
        default=32 * MB,
        ge=1,
        description="Largest request body; larger ones get 413 before being read.",
    )
    max_image_bytes: int = Field(default=20 * MB, ge=1, description="Largest encoded image (413).")
    max_image_pixels: int = Field(
        default=40 * MB, ge=1, description="Most pixels in one image, read from its header (413)."
    )
    max_images_per_request: int = Field(default=8, ge=0, description="Most images in one request.")
    caption_prompt: str | None = Field(
        default=None,
        min_length=1,
        description="The prompt /v1/caption uses when none is sent. Default: the checkpoint's "
        "(mmgpt.json), else 'Describe the image.'",
    )
    allowed_media_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated hosts that http(s) image URLs may name. "
        "Empty: only data: URLs.",
    )
    media_fetch_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to fetch one remote image."
    )

    @field_validator(
        "api_keys", "allowed_media_domains", "lora_modules", "lora_dirs", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        """A comma-separated string, or a list of them (a flag given several values)."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return [part.strip() for item in value for part in item.split(",") if part.strip()]
        return value

    @field_validator("lora_modules")
    @classmethod
    def _named_paths(cls, modules: list[str]) -> list[str]:
        names = [lora_module(module)[0] for module in modules]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"adapter names given twice: {', '.join(repeated)}")
        return modules

    @field_validator("allowed_media_domains")
    @classmethod
    def _lower_hosts(cls, hosts: list[str]) -> list[str]:
        return [host.lower().rstrip(".") for host in hosts]

    @model_validator(mode="after")
    def _slots_for_the_modules(self) -> Settings:
        if len(self.lora_modules) > self.max_loras:
            raise ValueError(
                f"{len(self.lora_modules)} adapters in lora_modules but max_loras is "
                f"{self.max_loras}"
            )
        return self

    def model_path(self) -> Path:
        """The checkpoint to load, checked to exist: a folder, a .gguf file or a folder of one."""
        path = Path(self.model) if self.model else default_model_path()
        if not _is_checkpoint(path):
            raise ModelPathError(_missing_model_message(path, default=self.model is None))
        return path

    def model_id(self) -> str:
        """The id clients use: --served-model-name, else the checkpoint folder's name."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).resolve().name if self.model else DEFAULT_MODEL_NAME

    def api_key_values(self) -> list[str]:
        return [key.get_secret_value() for key in self.api_keys]

    def engine_config(self) -> EngineConfig:
        """The engine's plain dataclass: EngineConfig's fields copied by name, and the
        adapters to serve."""
        values = {
            spec.name: getattr(self, spec.name)
            for spec in dataclasses.fields(EngineConfig)
            if spec.name not in ENGINE_FIELDS_DERIVED
        }
        modules = tuple(lora_module(module) for module in self.lora_modules)
        return EngineConfig(
            model=str(self.model_path()),
            enable_lora=bool(modules) or self.allow_runtime_lora,
            lora_modules=modules,
            **values,
        )


ENGINE_FIELDS_DERIVED = ("model", "enable_lora", "lora_modules")


def lora_module(module: str) -> tuple[str, str]:
    """NAME=PATH -> (name, path)."""
    name, sep, path = module.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"expected NAME=PATH for an adapter, got {module!r}")
    return name.strip(), path.strip()


def default_model_path() -> Path:
    """models/checkpoints/mmgpt-scenes, found without importing the models package (torch)."""
    spec = importlib.util.find_spec("models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError("The 'models' package is not installed; pass --model PATH.")
    return Path(next(iter(spec.submodule_search_locations))) / "checkpoints" / DEFAULT_MODEL_NAME


def _is_checkpoint(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    return (path / "config.json").is_file() or any(path.glob("*.gguf"))


def _missing_model_message(path: Path, *, default: bool) -> str:
    if default:
        return (
            f"The default model is missing: {path} has no config.json. Train or copy it there "
            "(see models/scenes), or serve another checkpoint with --model PATH or MMGPT_MODEL."
        )
    return (
        f"No checkpoint at {path}: expected a folder with config.json (Hugging Face format), "
        "a .gguf file or a folder holding one."
    )
