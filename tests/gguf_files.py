"""Tiny GGUF files written from tiny Hugging Face checkpoints, as llama.cpp's converter would.

The `gguf` package's writer stores the config as llama.cpp's metadata keys, the
byte-level BPE tokenizer (tokens, types, merges, special ids, chat template) and the
tensors under GGUF names, Llama's q/k rows permuted the way llama.cpp expects them,
2-D weights in the requested type and the 1-D norms in F32 (as llama.cpp keeps them).
Gemma 3's norms are stored as (1 + weight), as llama.cpp's converter writes them. Rope
scaling is written from the folder's config as llama.cpp does: a linear factor as the
`rope.scaling.*` keys, Llama 3's frequency adjustment as the `rope_freqs` factors.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# transformers' model_type -> llama.cpp's architecture
ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
}
TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}


def write_gguf(
    folder: Path,
    out_path: Path,
    tensor_type: str = "f32",
    leave_out: tuple[str, ...] = (),
    rope_scaling_type: str | None = None,
) -> Path:
    """The checkpoint in `folder` (a Llama, Qwen2, Qwen3 or Gemma 3 text model) as one GGUF
    file at `out_path`, without the tensors named in `leave_out`; `rope_scaling_type`
    writes that `rope.scaling.type` (with factor 2) whatever the config says."""
    config = json.loads((folder / "config.json").read_text())
    arch = ARCHITECTURES[config["model_type"]]
    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[arch])
    _write_config(writer, config)
    _write_tokenizer(writer, folder)
    _write_rope_scaling(writer, config, folder, rope_scaling_type)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for name, array in sorted(load_file(str(folder / "model.safetensors")).items()):
        if name in leave_out:
            continue
        array = _permuted(name, array, config) if arch == gguf.MODEL_ARCH.LLAMA else array
        if arch == gguf.MODEL_ARCH.GEMMA3 and name.endswith("norm.weight"):
            array = array + 1
        base, suffix = name.rsplit(".", 1)
        _add_tensor(writer, f"{names.get_name(base)}.{suffix}", array, TYPES[tensor_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _write_config(writer: gguf.GGUFWriter, config: dict) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_global_rope(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _global_rope(config: dict) -> dict:
    """The rope parameters of the global layers (Gemma 3 keeps one set per layer type)."""
    params = config["rope_parameters"]
    return dict(params.get("full_attention", params))


def _write_rope_scaling(
    writer: gguf.GGUFWriter, config: dict, folder: Path, scaling_type: str | None
) -> None:
    params = _global_rope(config)
    if scaling_type is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(scaling_type))
        writer.add_rope_scaling_factor(2.0)
    elif params["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(params["factor"])
    elif params["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_factors(folder, params["rope_theta"]))


def _llama3_factors(folder: Path, theta: float) -> np.ndarray:
    """What llama.cpp's converter stores for Llama 3's rope: per frequency, the divisor
    that turns the plain inverse frequency into Llama 3's."""
    adjusted, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(folder), "cpu")
    dim = adjusted.shape[0] * 2
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / adjusted).numpy().astype(np.float32)


def _write_tokenizer(writer: gguf.GGUFWriter, folder: Path) -> None:
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {added["content"] for added in tokenizer["added_tokens"] if added["special"]}
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([control if token in special else normal for token in tokens])
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab[settings["bos_token"]])
    writer.add_eos_token_id(vocab[settings["eos_token"]])
    writer.add_pad_token_id(vocab[settings["pad_token"]])
    writer.add_add_bos_token(True)
    writer.add_chat_template(_chat_template(folder, settings))


def _chat_template(folder: Path, settings: dict) -> str:
    if "chat_template" in settings:
        return str(settings["chat_template"])
    return (folder / "chat_template.jinja").read_text()


def _permuted(name: str, array: np.ndarray, config: dict) -> np.ndarray:
    """llama.cpp's row order for Llama's q and k: each head's rotary halves interleaved."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for projection, count in heads.items():
        if name.endswith(f"{projection}.weight"):
            shape = array.shape
            halves = array.reshape(count, 2, shape[0] // count // 2, *shape[1:])
            return halves.swapaxes(1, 2).reshape(shape)
    return array


def _add_tensor(
    writer: gguf.GGUFWriter, name: str, array: np.ndarray, tensor_type: gguf.GGMLQuantizationType
) -> None:
    array = array.astype(np.float32)
    if array.ndim == 1 or tensor_type == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array)
    elif tensor_type == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type)
