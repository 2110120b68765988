"""The base checkpoint as transformers loads it, its prompt format, and the LoRA wrapping.

Target modules are given as leaf names of the decoder's linear layers (`q_proj`,
`down_proj`, GPT-2's `c_attn`, ...) and turned into one regular expression anchored at
the decoder, so that a vision tower's layers of the same names are never adapted.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from models import BUILDERS, MULTIMODAL_ARCHITECTURES, checkpoint
from models.finetune.config import FinetuneConfig
from models.finetune.encode import PromptFormat
from models.llava import image_seq_length_of

PROJECTOR = "multi_modal_projector"


def is_multimodal(folder: Path) -> bool:
    return checkpoint.read_architecture(folder, list(BUILDERS)) in MULTIMODAL_ARCHITECTURES


def load_prompt_format(folder: Path) -> PromptFormat:
    """The tokenizer, chat template and image processor, loaded as the server loads them."""
    config = checkpoint.load_config(folder)
    tokenizer = checkpoint.load_tokenizer(folder)
    image_processor = checkpoint.load_image_processor(folder) if is_multimodal(folder) else None
    template = getattr(tokenizer, "chat_template", None) or getattr(
        image_processor, "chat_template", None
    )
    if not template:
        raise ValueError(f"{folder}: the checkpoint has no chat template to render data with")
    text_config = getattr(config, "text_config", None) or config
    max_length = getattr(text_config, "max_position_embeddings", None) or text_config.n_positions
    return PromptFormat(
        tokenizer=tokenizer,
        chat_template=template,
        image_processor=image_processor,
        image_token_id=getattr(config, "image_token_id", None) if image_processor else None,
        image_seq_length=image_seq_length_of(folder, config) if image_processor else 0,
        max_length=int(max_length),
    )


def load_base_model(folder: Path, device: str) -> PreTrainedModel:
    auto = AutoModelForImageTextToText if is_multimodal(folder) else AutoModelForCausalLM
    model: PreTrainedModel = auto.from_pretrained(
        str(folder), dtype=torch.float32, device_map=torch.device(device)
    )
    return model


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def decoder_linear_names(model: PreTrainedModel) -> list[str]:
    """The leaf names of the linear layers inside the decoder's blocks."""
    decoder = model.get_decoder()
    names = {name.rsplit(".", 1)[-1] for name, m in decoder.named_modules() if _is_linear(m)}
    return sorted(names)


def target_pattern(model: PreTrainedModel, leaves: tuple[str, ...], projector: bool) -> str:
    """A regular expression peft full-matches against module names."""
    available = decoder_linear_names(model)
    unknown = [leaf for leaf in leaves if leaf not in available]
    if unknown:
        raise ValueError(
            f"unknown target modules {', '.join(unknown)}; the decoder has {', '.join(available)}"
        )
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    alternatives = "|".join(re.escape(leaf) for leaf in leaves or available)
    patterns = [rf"{re.escape(prefix)}\..*\.(?:{alternatives})"]
    if projector:
        projector_layers = [n for n, m in model.named_modules() if PROJECTOR in n and _is_linear(m)]
        if not projector_layers:
            raise ValueError("the model has no multimodal projector to adapt")
        patterns += [re.escape(name) for name in projector_layers]
    return "|".join(patterns)


def add_lora(model: PreTrainedModel, config: FinetuneConfig) -> PeftModel:
    pattern = target_pattern(model, config.target_modules, config.train_projector)
    uses_conv1d = any(
        isinstance(m, Conv1D) and re.fullmatch(pattern, n) for n, m in model.named_modules()
    )
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=pattern,
        fan_in_fan_out=uses_conv1d,  # GPT-2's Conv1D stores its weight transposed
    )
    return get_peft_model(model, lora)
