"""Tiny GGUF files written from tiny Hugging Face checkpoints, as llama.cpp's converter would.

The `gguf` package's writer stores the config as llama.cpp's metadata keys, the
byte-level BPE tokenizer (tokens, types, merges, special ids, chat template) and the
tensors under GGUF names, Llama's q/k rows permuted the way llama.cpp expects them,
2-D weights in the requested type and the 1-D norms in F32 (as llama.cpp keeps them).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

# transformers' model_type -> llama.cpp's architecture
ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
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
    rope_scaling: str | None = None,
) -> Path:
    """The checkpoint in `folder` (a Llama, Qwen2 or Qwen3) as one GGUF file at `out_path`,
    without the tensors named in `leave_out`; `rope_scaling` "linear" writes llama.cpp's
    scaling keys, "rope_freqs" the frequency factors of Llama 3.1 and later (all ones)."""
    config = json.loads((folder / "config.json").read_text())
    arch = ARCHITECTURES[config["model_type"]]
    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[arch])
    _write_config(writer, config)
    _write_tokenizer(writer, folder)
    _write_rope_scaling(writer, config, rope_scaling)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for name, array in sorted(load_file(str(folder / "model.safetensors")).items()):
        if name in leave_out:
            continue
        array = _permuted(name, array, config) if arch == gguf.MODEL_ARCH.LLAMA else array
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
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _write_rope_scaling(writer: gguf.GGUFWriter, config: dict, rope_scaling: str | None) -> None:
    if rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)
    elif rope_scaling == "rope_freqs":
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        writer.add_tensor("rope_freqs.weight", np.ones(head_dim // 2, dtype=np.float32))


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
