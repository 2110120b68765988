"""Which weights of a loaded model an adapter can adapt, under PEFT's module names.

Our decoders fuse q/k/v and gate/up, so one PEFT module is one part of a fused weight.
The module names are transformers 5's for each architecture; a family joins by a row in
DECODER_MODULE_PREFIX (its decoder built on `LlamaDecoder`'s layer weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from models.lora.adapter import LoraLoadError, LoraSite
from models.lora.projection import LoraProjection

DECODER_MODULE_PREFIX = {
    "LlamaForCausalLM": "model.",
    "Qwen2ForCausalLM": "model.",
    "Qwen3ForCausalLM": "model.",
    "LlavaForConditionalGeneration": "model.language_model.",
    "Qwen2VLForConditionalGeneration": "model.language_model.",
    "Qwen2_5_VLForConditionalGeneration": "model.language_model.",
    "Qwen3VLForConditionalGeneration": "model.language_model.",
    "SmolVLMForConditionalGeneration": "model.text_model.",
    "Idefics3ForConditionalGeneration": "model.text_model.",
    "Gemma3ForCausalLM": "model.",
    "Gemma3ForConditionalGeneration": "model.language_model.",
}
PROJECTOR_MODULES = ("model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2")

# weight field of a Llama layer -> its parts' PEFT module names
FUSED_PARTS = {
    "qkv_weight": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_weight": ("self_attn.o_proj",),
    "gate_up_weight": ("mlp.gate_proj", "mlp.up_proj"),
    "down_weight": ("mlp.down_proj",),
}

NewProjection = Callable[[int, list[int]], LoraProjection]  # (in_features, part widths)


def decoder_sites(
    model: Any, new_projection: NewProjection
) -> tuple[dict[str, LoraSite], dict[int, LoraProjection]]:
    """Sites of every decoder layer, and each layer's projections by its weights' ids."""
    prefix = DECODER_MODULE_PREFIX.get(model.info.architecture)
    if prefix is None:
        raise LoraLoadError(model.info.name, f"LoRA is not served for {model.info.architecture}")
    sites: dict[str, LoraSite] = {}
    by_weight: dict[int, LoraProjection] = {}
    dims = model.decoder.dims
    for index, layer in enumerate(model.layers):
        widths = _part_widths(dims)
        for field, modules in FUSED_PARTS.items():
            weight = getattr(layer.w, field)
            projection = new_projection(weight.shape[1], widths[field])
            by_weight[id(weight)] = projection
            for part, module in enumerate(modules):
                name = f"{prefix}layers.{index}.{module}"
                sites[name] = LoraSite(projection, part, widths[field][part], weight.shape[1])
    return sites, by_weight


def _part_widths(dims: Any) -> dict[str, list[int]]:
    q_width, kv_width = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    inter = dims.intermediate_size
    return {
        "qkv_weight": [q_width, kv_width, kv_width],
        "o_weight": [dims.hidden_size],
        "gate_up_weight": [inter, inter],
        "down_weight": [dims.hidden_size],
    }


def projector_sites(
    model: Any, new_projection: NewProjection
) -> tuple[dict[str, LoraSite], dict[int, LoraProjection]]:
    """LLaVA's two projector layers; other families' projectors take no adapter."""
    if model.info.architecture != "LlavaForConditionalGeneration":
        return {}, {}
    projector = model.projector
    sites: dict[str, LoraSite] = {}
    by_weight: dict[int, LoraProjection] = {}
    for name, weight in zip(PROJECTOR_MODULES, projector[0::2], strict=True):
        assert isinstance(weight, torch.Tensor)
        projection = new_projection(weight.shape[1], [weight.shape[0]])
        by_weight[id(weight)] = projection
        sites[name] = LoraSite(projection, 0, weight.shape[0], weight.shape[1])
    return sites, by_weight
