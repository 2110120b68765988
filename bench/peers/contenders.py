"""The servers of a comparison, and the one set of thread settings they all get.

Every contender runs on loopback with the same environment: OMP_NUM_THREADS and
MKL_NUM_THREADS set to `threads` (torch sizes its intra-op pool from them),
TOKENIZERS_PARALLELISM=false, and the Hugging Face hub switched off. Servers
that take a thread flag get it as well (mmgpt --num-threads, naive --threads).

`transformers serve` starts through bench.peers.transformers_images, which runs
transformers' own command line after registering image-only processors for the
families whose video processors need torchvision (nothing else changes).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.peers import llama_cpp
from bench.workloads import WORKLOADS

TEXT_AND_CHAT = frozenset({"text", "chat-image", "chat-image-mixed"})
# (max_tokens, the checkpoint's image placeholder ids) -> request fields; see Contender
BanEos = Callable[[int, Sequence[int]], dict[str, Any]]


@dataclass(frozen=True)
class LaunchSettings:
    model: str
    port: int
    threads: int
    host: str = "127.0.0.1"
    dtype: str | None = None  # None: each server's default for the checkpoint
    device: str | None = None
    extra_args: dict[str, str] = field(default_factory=dict)  # contender name -> extra flags
    parallel: int = 1  # the streams at once: llama-server's slots
    context: int = 4096  # tokens one stream may hold: llama-server's context per slot


@dataclass(frozen=True)
class Contender:
    name: str
    command: Callable[[LaunchSettings], list[str]]
    ready_path: str
    workloads: frozenset[str]  # the workloads its API can serve
    accepts_ignore_eos: bool = True  # the vLLM extension; without it outputs may end at EOS
    # The fields that keep EOS and the image placeholders from being sampled before
    # max_tokens (`--ban-eos`): every contender then generates by the same rule, so that
    # greedy outputs can be compared token for token. None: it has no way to say so.
    ban_eos_fields: BanEos | None = None


def _optional(flag: str, value: str | None) -> list[str]:
    return [flag, value] if value else []


def _mmgpt(settings: LaunchSettings) -> list[str]:
    return [
        *(sys.executable, "-m", "app.cli", "serve", "--model", settings.model),
        *("--host", settings.host, "--port", str(settings.port)),
        *("--num-threads", str(settings.threads), "--log-level", "warning"),
        *_optional("--dtype", settings.dtype),
        *_optional("--device", settings.device),
    ]


def _mmgpt_int8(settings: LaunchSettings) -> list[str]:
    return [*_mmgpt(settings), "--quantization", "int8"]


def _mmgpt_bf16(settings: LaunchSettings) -> list[str]:
    return [*_mmgpt(settings), "--dtype", "bfloat16"]


def _mmgpt_each_token(settings: LaunchSettings) -> list[str]:
    """Every token its own event, however fast the stream (app/engine/pacing.py)."""
    return [*_mmgpt(settings), "--stream-interval-ms", "0"]


def _transformers(settings: LaunchSettings) -> list[str]:
    return [
        *(sys.executable, "-m", "bench.peers.transformers_images", "serve", settings.model),
        "--continuous-batching",
        *("--host", settings.host, "--port", str(settings.port)),
        *_optional("--dtype", settings.dtype),
        *_optional("--device", settings.device or "cpu"),
    ]


def _naive(settings: LaunchSettings) -> list[str]:
    return [
        *(sys.executable, "-m", "bench.peers.naive", "--model", settings.model),
        *("--host", settings.host, "--port", str(settings.port)),
        *("--threads", str(settings.threads)),
        *_optional("--dtype", settings.dtype),
        *_optional("--device", settings.device),
    ]


def _llama_cpp(quant: str) -> Callable[[LaunchSettings], list[str]]:
    def command(settings: LaunchSettings) -> list[str]:
        return llama_cpp.server_command(
            settings.model,
            quant,
            settings.host,
            settings.port,
            settings.threads,
            settings.parallel,
            settings.context,
        )

    return command


def _ignore_eos(max_tokens: int, placeholders: Sequence[int]) -> dict[str, Any]:
    """A server whose `ignore_eos` bans EOS for the whole answer: with every answer
    max_tokens long, the same rule as min_tokens = max_tokens."""
    return {"ignore_eos": True}


def _mmgpt_ban_eos(max_tokens: int, placeholders: Sequence[int]) -> dict[str, Any]:
    """min_tokens bans EOS until then; mmgpt's sampler never samples an image placeholder."""
    return {"min_tokens": max_tokens}


def _transformers_ban_eos(max_tokens: int, placeholders: Sequence[int]) -> dict[str, Any]:
    """Its `generation_config` request field: generate()'s own min_new_tokens and
    suppress_tokens (the logits processors that set those logits to -inf)."""
    rules = {"min_new_tokens": max_tokens, "suppress_tokens": list(placeholders)}
    return {"generation_config": json.dumps(rules)}


CONTENDERS = {
    "mmgpt": Contender(
        "mmgpt", _mmgpt, "/ready", frozenset(WORKLOADS), ban_eos_fields=_mmgpt_ban_eos
    ),
    # mmgpt again, with int8 weights or in bfloat16
    "mmgpt-int8": Contender(
        "mmgpt-int8", _mmgpt_int8, "/ready", frozenset(WORKLOADS), ban_eos_fields=_mmgpt_ban_eos
    ),
    "mmgpt-bf16": Contender(
        "mmgpt-bf16", _mmgpt_bf16, "/ready", frozenset(WORKLOADS), ban_eos_fields=_mmgpt_ban_eos
    ),
    "mmgpt-each-token": Contender(
        "mmgpt-each-token",
        _mmgpt_each_token,
        "/ready",
        frozenset(WORKLOADS),
        ban_eos_fields=_mmgpt_ban_eos,
    ),
    # `transformers serve` has no readiness route; /health answers once the preloaded model is in.
    # It answers 422 to `ignore_eos` (for models it serves without continuous batching).
    "transformers": Contender(
        "transformers",
        _transformers,
        "/health",
        TEXT_AND_CHAT,
        accepts_ignore_eos=False,
        ban_eos_fields=_transformers_ban_eos,
    ),
    # Its ignore_eos is generate()'s min_new_tokens = max_tokens: the same ban as --ban-eos
    # asks (it cannot suppress an image placeholder: text workloads compare exactly).
    "naive": Contender("naive", _naive, "/ready", TEXT_AND_CHAT, ban_eos_fields=_ignore_eos),
    # llama.cpp's server on the checkpoint converted to GGUF (bench/peers/llama_cpp.py), text
    # only; its `ignore_eos` bans EOS for the whole answer, as --ban-eos asks.
    "llama.cpp": Contender(
        "llama.cpp",
        _llama_cpp("f32"),
        "/health",
        frozenset({"text"}),
        ban_eos_fields=_ignore_eos,
    ),
    "llama.cpp-q8": Contender(
        "llama.cpp-q8",
        _llama_cpp("q8_0"),
        "/health",
        frozenset({"text"}),
        ban_eos_fields=_ignore_eos,
    ),
}


def image_placeholder_ids(model: str) -> list[int]:
    """The image token id a checkpoint's config.json names (Qwen-VL, SmolVLM, LLaVA), if any."""
    config = json.loads((Path(model) / "config.json").read_text())
    ids = (config.get(key) for key in ("image_token_id", "image_token_index"))
    return [value for value in ids if isinstance(value, int)][:1]


def command_line(contender: Contender, settings: LaunchSettings) -> list[str]:
    extra = settings.extra_args.get(contender.name, "")
    return contender.command(settings) + shlex.split(extra)


def ensure_hub_cache() -> None:
    """`transformers serve` lists its models from the Hugging Face hub cache and answers
    /v1/models with a 500 where that folder does not exist yet, as on a fresh machine."""
    from huggingface_hub import constants

    Path(constants.HF_HUB_CACHE).mkdir(parents=True, exist_ok=True)


def server_env(threads: int) -> dict[str, str]:
    """The environment every contender starts with (see the module docstring)."""
    return os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
