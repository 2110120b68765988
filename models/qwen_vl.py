"""Qwen2-VL and Qwen2.5-VL: a native-resolution vision tower and our Qwen2 decoder with M-RoPE.

The vision tower and its patch merger are transformers' own modules (Qwen2.5-VL's with
window attention); they take every new image of a step packed into one call, the
patches of all images concatenated and one (t, h, w) grid row per image, as the
reference implementation does. An image becomes t*h*w / merge² placeholder tokens, a
number its size decides. The decoder is `LlamaDecoder` with q/k/v bias, whose rotary
lookup reads multi-section positions [3, T] (models/mrope.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from models.attention import KVCache
from models.attention_inputs import AttentionInputs
from models.checkpoint import CONFIG_FILE
from models.errors import ModelLoadError
from models.layers import PagedDecoderModel
from models.llama import LlamaDecoder
from models.llava import embed_with_images, no_init_weights
from models.mrope import MultimodalRotaryEmbedding, prompt_positions
from models.weights import CheckpointWeights

VISION_TOWERS: dict[str, Any] = {  # by the checkpoint's model_type
    "qwen2_vl": Qwen2VisionTransformerPretrainedModel,
    "qwen2_5_vl": Qwen2_5_VisionTransformerPretrainedModel,
    "qwen3_vl": Qwen3VLVisionModel,
}
# Stored prefix -> canonical prefix: transformers 5 module names, then those of 4.x.
QWEN_VL_RENAMES = (
    ("model.language_model.", "language_model."),
    ("model.visual.", "visual."),
    ("model.", "language_model."),
)


def canonical_qwen_vl_name(stored: str) -> str:
    for old, new in QWEN_VL_RENAMES:
        if stored.startswith(old):
            return new + stored[len(old) :]
    return stored


class QwenVLForConditionalGeneration(PagedDecoderModel):
    position_sections = 3
    model_types: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")
    # the text decoder: Qwen2's q/k/v bias, consecutive M-RoPE sections
    qkv_bias_always, qk_norm, interleaved_mrope = True, False, False

    def __init__(self, config: PretrainedConfig, decoder: LlamaDecoder, tower: Any) -> None:
        self.decoder, self.tower = decoder, tower
        self.adopt_dims(decoder)
        self.image_token_id = self._image_token = int(config.image_token_id)
        self.merge_size = int(config.vision_config.spatial_merge_size)
        mrope_section = _rope_parameters(config.text_config)["mrope_section"]
        decoder.rope = MultimodalRotaryEmbedding(  # type: ignore[assignment]
            decoder.rope, mrope_section, self.interleaved_mrope
        )

    def image_tokens(self, tensors: Mapping[str, Any]) -> int:
        t, h, w = self._merged_grid(tensors)
        return t * h * w

    def _merged_grid(self, tensors: Mapping[str, Any]) -> tuple[int, int, int]:
        t, h, w = (int(v) for v in np.asarray(tensors["image_grid_thw"]).reshape(3))
        return t, h // self.merge_size, w // self.merge_size

    def prompt_positions(
        self, num_tokens: int, image_starts: Sequence[int], images: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, int]:
        """Positions [3, num_tokens] and the offset of the tokens after the prompt."""
        grids = [self._merged_grid(tensors) for tensors in images]
        return prompt_positions(num_tokens, image_starts, grids)

    @torch.inference_mode()
    def encode_image_batch(
        self, images: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Every image's patches in one tower call; per image [its tokens, hidden]."""
        patches = torch.cat([image["pixel_values"] for image in images])  # [sum patches, C*T*P*P]
        grids = torch.stack([image["image_grid_thw"].reshape(3) for image in images]).long()
        pixels = patches.to(device=self.device, dtype=self.dtype)
        output = self.tower(pixels, grid_thw=grids.to(self.device))
        counts = (grids.prod(-1) // self.merge_size**2).tolist()
        return list(self.image_rows(output).split(counts))

    def image_rows(self, tower_output: Any) -> torch.Tensor:
        """The rows a step's image tokens take from the tower's output: [tokens, hidden]."""
        return tower_output.pooler_output

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [3, T]
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
        image_embeds: torch.Tensor | None = None,  # [image tokens in input_ids, hidden]
    ) -> torch.Tensor:  # [T, hidden]
        hidden = self.embed_with_images(input_ids, image_embeds)
        return self.decoder.run(hidden, positions, attn_inputs, kv_cache)

    def embed_with_images(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings [T, hidden], the image tokens' rows replaced by `image_embeds`."""
        if image_embeds is None:
            return self.decoder.embed(input_ids)  # [T, hidden]
        return embed_with_images(self.decoder, input_ids, self._image_token, image_embeds)


def _rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    return dict(
        getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    )


def load_module(
    module: torch.nn.Module, weights: CheckpointWeights, prefix: str
) -> torch.nn.Module:
    """Fill a transformers module from the tensors under `prefix`, every one of them used."""
    stored = weights.take_prefix(prefix)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        problem = f"{prefix}* tensors: missing {missing[:5]}, unexpected {unexpected[:5]}"
        raise ModelLoadError(weights.folder, problem)
    for name, tensor in stored.items():
        if tensor.shape != expected[name].shape:
            shapes = f"{tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            raise ModelLoadError(weights.folder, f"{prefix}{name} has shape {shapes}")
    module.load_state_dict(stored, strict=True)
    return module


def _tied(config: PretrainedConfig) -> bool:
    text_tied = getattr(config.text_config, "tie_word_embeddings", False)
    return bool(getattr(config, "tie_word_embeddings", False) or text_tied)


def _check_config(folder: Path, config: PretrainedConfig, model_types: tuple[str, ...]) -> None:
    text = config.text_config
    if config.model_type not in model_types:
        raise ModelLoadError(folder / CONFIG_FILE, f"model_type {config.model_type!r} unsupported")
    if getattr(text, "use_sliding_window", False):
        raise ModelLoadError(folder / CONFIG_FILE, "sliding-window attention is not supported")
    if "mrope_section" not in _rope_parameters(text):
        raise ModelLoadError(folder / CONFIG_FILE, "rope parameters name no mrope_section")


def build_qwen_vl(
    config: PretrainedConfig,
    folder: Path,
    dtype: torch.dtype,
    device: torch.device,
    model_class: type[QwenVLForConditionalGeneration] = QwenVLForConditionalGeneration,
) -> QwenVLForConditionalGeneration:
    _check_config(folder, config, model_class.model_types)
    weights = CheckpointWeights(folder, rename=canonical_qwen_vl_name)
    decoder = LlamaDecoder(
        config.text_config,
        weights,
        prefix="language_model.",
        lm_head_name="lm_head.weight",
        tied=_tied(config),
        dtype=dtype,
        device=device,
        qkv_bias_always=model_class.qkv_bias_always,
        qk_norm=model_class.qk_norm,
    )
    with no_init_weights():
        tower = VISION_TOWERS[config.model_type]._from_config(config.vision_config)
    load_module(tower, weights, "visual.")
    weights.check_all_used()
    return model_class(config, decoder, tower.to(device, dtype).eval())
