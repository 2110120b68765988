"""Model definitions and loading: `load_model(path, device, dtype) -> LoadedModel`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PretrainedConfig

from models import checkpoint, gguf
from models.base import LoadedModel, ModelInfo
from models.errors import ModelLoadError
from models.gemma3 import build_gemma3_text
from models.gemma3_vl import build_gemma3_vl
from models.gpt2 import build_gpt2
from models.layers import PagedDecoderModel
from models.llama import build_llama
from models.llava import build_llava
from models.lora import LoraLoadError, enable_lora
from models.quantize import prepare_decoder
from models.qwen3_vl import build_qwen3_vl
from models.qwen_vl import build_qwen_vl
from models.smolvlm import build_smolvlm
from models.tile_processor import tiled_image_processor

Builder = Callable[[PretrainedConfig, Path, torch.dtype, torch.device], PagedDecoderModel]

BUILDERS: dict[str, Builder] = {
    "LlavaForConditionalGeneration": build_llava,
    "LlamaForCausalLM": build_llama,
    "Qwen2ForCausalLM": build_llama,
    "Qwen3ForCausalLM": build_llama,
    "Gemma3ForCausalLM": build_gemma3_text,
    "Gemma3ForConditionalGeneration": build_gemma3_vl,
    "GPT2LMHeadModel": build_gpt2,
    "Qwen2VLForConditionalGeneration": build_qwen_vl,
    "Qwen2_5_VLForConditionalGeneration": build_qwen_vl,
    "Qwen3VLForConditionalGeneration": build_qwen3_vl,
    "SmolVLMForConditionalGeneration": build_smolvlm,
    "Idefics3ForConditionalGeneration": build_smolvlm,
}
MULTIMODAL_ARCHITECTURES = frozenset(
    {
        "LlavaForConditionalGeneration",
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
        "SmolVLMForConditionalGeneration",
        "Idefics3ForConditionalGeneration",
        "Gemma3ForConditionalGeneration",
    }
)
TILED_ARCHITECTURES = frozenset(
    {"SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration"}
)
logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = [
    "BUILDERS",
    "LoadedModel",
    "LoraLoadError",
    "ModelInfo",
    "ModelLoadError",
    "enable_lora",
    "load_model",
]


def _resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def _cpu_has_fast_half() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    quantization: str = "none",
) -> LoadedModel:
    """Load a Hugging Face checkpoint folder or a GGUF file (or a folder holding one);
    raise `ModelLoadError` if it cannot be served. `quantization` "int8" stores the decoder
    layers' matrices as int8 (models/quantize.py)."""
    source = Path(path).expanduser()
    target = torch.device(device)
    gguf_file = gguf.find_gguf_file(source)
    if gguf_file is not None:
        return _load_gguf(gguf_file, target, dtype, quantization)
    if not source.is_dir():
        raise ModelLoadError(source, "not a directory")
    return _load_folder(source, target, dtype, quantization)


def _load_folder(
    folder: Path, target: torch.device, dtype: torch.dtype | str, quantization: str
) -> LoadedModel:
    architecture = checkpoint.read_architecture(folder, list(BUILDERS))
    config = checkpoint.load_config(folder)
    tokenizer = checkpoint.load_tokenizer(folder)
    is_multimodal = architecture in MULTIMODAL_ARCHITECTURES
    image_processor = checkpoint.load_image_processor(folder) if is_multimodal else None
    resolved = _checked_dtype(dtype, target)
    model = BUILDERS[architecture](config, folder, resolved, target)
    prepare_decoder(model, quantization)
    if architecture in TILED_ARCHITECTURES:  # the prompt text of the tiles needs the model's
        image_processor = tiled_image_processor(
            image_processor, folder, tokenizer, model.image_seq_length, model.image_token_id
        )
    gen_config = checkpoint.generation_config(folder)
    model.info = _model_info(folder, architecture, model, config, gen_config, tokenizer)
    return _loaded(model, tokenizer, image_processor, gen_config, folder)


def _load_gguf(
    path: Path, target: torch.device, dtype: torch.dtype | str, quantization: str
) -> LoadedModel:
    """Config, tokenizer and dequantised tensors through transformers' GGUF support, then the
    same strict builder as a folder; the file carries no generation config."""
    architecture, config = gguf.read_config(path)
    tokenizer = gguf.load_tokenizer(path)
    resolved = _checked_dtype(dtype, target)
    weights = gguf.load_weights(path, config, resolved)
    build = build_gemma3_text if architecture == "Gemma3ForCausalLM" else build_llama
    model = build(config, path, resolved, target, weights=weights)
    prepare_decoder(model, quantization)
    model.info = _model_info(path, architecture, model, config, {}, tokenizer)
    return _loaded(model, tokenizer, None, {}, path)


def _checked_dtype(dtype: torch.dtype | str, target: torch.device) -> torch.dtype:
    resolved = _resolve_dtype(dtype, target)
    if resolved != torch.float32 and target.type == "cpu" and not _cpu_has_fast_half():
        logger.warning("%s on a CPU without AVX-512: expect float32 to be faster", resolved)
    return resolved


def _loaded(
    model: PagedDecoderModel,
    tokenizer: object,
    image_processor: object,
    gen_config: dict,
    source: Path,
) -> LoadedModel:
    chat_template = (
        getattr(tokenizer, "chat_template", None)
        or getattr(image_processor, "chat_template", None)
        or (checkpoint.processor_chat_template(source) if source.is_dir() else None)
    )
    return LoadedModel(
        model=model,
        info=model.info,
        tokenizer=tokenizer,
        image_processor=image_processor,
        chat_template=chat_template,
        generation_defaults=checkpoint.sampling_defaults(gen_config),
        path=str(source),
    )


def _model_info(
    source: Path,
    architecture: str,
    model: PagedDecoderModel,
    config: PretrainedConfig,
    gen_config: dict,
    tokenizer: object,
) -> ModelInfo:
    configs = [config, getattr(config, "text_config", None)]
    configs = [c for c in configs if c is not None]
    eos_ids = checkpoint.eos_token_ids(gen_config, configs, tokenizer)
    if not eos_ids:
        raise ModelLoadError(source, "no eos_token_id in generation_config, config or tokenizer")
    return ModelInfo(
        name=source.resolve().name,
        architecture=architecture,
        num_layers=model.num_layers,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        hidden_size=model.hidden_size,
        vocab_size=model.vocab_size,
        max_model_len=model.max_positions,
        dtype=model.dtype,
        device=model.device,
        eos_token_ids=eos_ids,
        bos_token_id=checkpoint.first_token_id("bos_token_id", gen_config, configs, tokenizer),
        pad_token_id=checkpoint.first_token_id("pad_token_id", gen_config, configs, tokenizer),
        image_token_id=model.image_token_id,
        image_seq_length=model.image_seq_length,
        image_size=model.image_size,
        position_sections=model.position_sections,
        sliding_window=model.sliding_window,
        image_spans_in_one_chunk=model.image_spans_in_one_chunk,
        image_prompt=model.image_prompt(tokenizer),
        caption_prompt=_caption_prompt(source),
    )


def _caption_prompt(source: Path) -> str:
    """From the folder's mmgpt.json; a GGUF file's from the mmgpt.json beside it."""
    folder = source if source.is_dir() else source.parent
    return checkpoint.caption_prompt(folder, ModelInfo.caption_prompt)
