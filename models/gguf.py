"""GGUF files (llama.cpp's and Ollama's format), dequantised on load.

transformers reads the three parts a GGUF carries: the config (from llama.cpp's
metadata keys), the tokenizer with its chat template, and the tensors, dequantised and
renamed to the Hugging Face names. Its model object is only the way to the state dict:
the tensors then go through the same strict builder as a safetensors folder's, so a
GGUF is checked (every tensor used, every shape right) exactly like a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from models.errors import ModelLoadError
from models.weights import CheckpointWeights

GGUF_SUFFIX = ".gguf"
# transformers' model_type of a GGUF -> the architecture that serves it
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# llama.cpp's mark of the one Gemma 3 (27B) whose attention scale is not its head size's
GEMMA3_27B_LAYERS = 62


def find_gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one .gguf in a folder that has no
    config.json (a Hugging Face folder wins); None when `path` is not a GGUF source."""
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX)
    if len(files) > 1:
        named = ", ".join(p.name for p in files)
        raise ModelLoadError(path, f"holds {len(files)} GGUF files ({named}); name one of them")
    return files[0] if files else None


def read_config(path: Path) -> tuple[str, PretrainedConfig]:
    """The architecture that serves the file, and its config."""
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # an unknown architecture or a broken header: many exception types
        raise ModelLoadError(path, f"cannot read the GGUF metadata ({exc})") from exc
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise ModelLoadError(
            path, f"unsupported GGUF architecture {model_type!r}; supported: {supported}"
        )
    _apply_file_metadata(path, config)
    return ARCHITECTURES[model_type], config


def _apply_file_metadata(path: Path, config: PretrainedConfig) -> None:
    """What transformers leaves unread. `attention.key_length` is the head_dim (a Qwen3
    GGUF would otherwise get the config class's default, 128). Rope scaling it drops:
    llama.cpp's linear `rope.scaling.*` keys (Gemma 3's on its global layers) and the
    `rope_freqs` factors of Llama 3.1 and later, which models/rope.py divides the
    frequencies by. Gemma 3's attention scale is not in the file: llama.cpp's rule."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    architecture = reader.fields["general.architecture"].contents()
    key_length = reader.fields.get(f"{architecture}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length.contents())
    if config.model_type == "gemma3_text":
        config.query_pre_attn_scalar = _gemma3_query_scalar(config)
    _apply_rope_scaling(path, reader, architecture, config)


def _gemma3_query_scalar(config: PretrainedConfig) -> int:
    if config.num_hidden_layers == GEMMA3_27B_LAYERS:
        return int(config.hidden_size // config.num_attention_heads)
    return int(config.head_dim)


def _apply_rope_scaling(
    path: Path, reader: Any, architecture: str, config: PretrainedConfig
) -> None:
    fields = reader.fields
    scaling = fields.get(f"{architecture}.rope.scaling.type")
    scaling_type = scaling.contents() if scaling is not None else "none"
    if scaling_type == "linear":
        factor = float(fields[f"{architecture}.rope.scaling.factor"].contents())
        params = config.rope_parameters
        scaled = params["full_attention"] if config.model_type == "gemma3_text" else params
        scaled.update(rope_type="linear", factor=factor)
    elif scaling_type != "none":
        raise ModelLoadError(path, f"GGUF rope scaling {scaling_type!r} is not supported")
    factors = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if factors:
        config.rope_freq_factors = [float(f) for f in factors[0].data]


def load_tokenizer(path: Path) -> Any:
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # a missing or broken vocabulary surfaces as many exception types
        raise ModelLoadError(path, f"cannot read the GGUF tokenizer ({exc})") from exc


def load_weights(path: Path, config: PretrainedConfig, dtype: torch.dtype) -> CheckpointWeights:
    """The file's tensors dequantised into `dtype`, under their Hugging Face names."""
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(path.parent),
            gguf_file=path.name,
            config=config,
            dtype=dtype,
            output_loading_info=True,
        )
    except Exception as exc:  # an unknown quantisation type, a truncated file, a bad shape
        raise ModelLoadError(path, f"cannot read the GGUF tensors ({exc})") from exc
    model, info = loaded
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(repr(name) for name in missing[:5])
        raise ModelLoadError(path, f"{len(missing)} tensors missing from the file: {shown}")
    return CheckpointWeights(path, tensors=model.state_dict())
