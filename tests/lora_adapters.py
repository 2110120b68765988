"""Tiny random LoRA adapters made by peft itself on transformers' model, and their reference.

`make_adapter` wraps a base checkpoint's transformers model with peft's `get_peft_model`,
fills every LoRA matrix with seeded random values (peft starts B at zero, which would hide
any mistake) and saves a standard PEFT folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

LLAVA_DECODER = r"model\.language_model\..*\.(?:{})"
PROJECTOR = r"model\.multi_modal_projector\.linear_[12]"


def reference_base(folder: Path, multimodal: bool) -> PreTrainedModel:
    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    model: PreTrainedModel = auto.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()


def make_adapter(
    base: Path,
    out: Path,
    *,
    rank: int,
    targets: list[str] | str,
    seed: int,
    multimodal: bool = False,
    alpha: float = 16.0,
    use_rslora: bool = False,
) -> Path:
    """A PEFT folder of rank `rank` over `targets` (peft's list or regex form)."""
    model = reference_base(base, multimodal)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora, lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(str(out))
    return out


def peft_reference(base: Path, adapter: Path | None, multimodal: bool = False) -> Any:
    """transformers' model with the adapter applied by peft; the bare base for None."""
    model = reference_base(base, multimodal)
    if adapter is None:
        return model
    return PeftModel.from_pretrained(model, str(adapter)).eval()
