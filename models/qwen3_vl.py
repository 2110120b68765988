"""Qwen3-VL: Qwen-VL's packed native-resolution path, a Qwen3 decoder and DeepStack.

The vision tower (transformers' own) also merges the features of a few intermediate
layers; DeepStack adds the k-th of them to the output of the decoder's k-th layer at
the image tokens' rows. `encode_image_batch` returns each image token's main row and
its DeepStack rows side by side ([tokens, hidden * (1 + levels)]), so the engine
caches and slices them like any embedding, and a prefill chunk cut inside an image
carries its levels with it. The decoder is Qwen3's (QK-norm) with interleaved M-RoPE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from models.attention import KVCache
from models.attention_inputs import AttentionInputs
from models.llama import AfterLayer
from models.qwen_vl import QwenVLForConditionalGeneration, build_qwen_vl


class Qwen3VLForConditionalGeneration(QwenVLForConditionalGeneration):
    model_types = ("qwen3_vl",)
    qkv_bias_always, qk_norm, interleaved_mrope = False, True, True

    def image_rows(self, tower_output: Any) -> torch.Tensor:
        """Each image token's main row, then its DeepStack rows: [tokens, hidden * (1 + levels)]."""
        return torch.cat([tower_output.pooler_output, *tower_output.deepstack_features], dim=-1)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [3, T]
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
        image_embeds: torch.Tensor | None = None,  # [image tokens, hidden * (1 + levels)]
    ) -> torch.Tensor:  # [T, hidden]
        if image_embeds is None:
            return super().forward(input_ids, positions, attn_inputs, kv_cache)
        hidden = self.embed_with_images(input_ids, image_embeds[:, : self.hidden_size])
        deepstack = self._deepstack(input_ids, image_embeds[:, self.hidden_size :])
        return self.decoder.run(hidden, positions, attn_inputs, kv_cache, deepstack)

    def _deepstack(self, input_ids: torch.Tensor, stacked: torch.Tensor) -> AfterLayer:
        """Adds level k of the image rows to decoder layer k's output, for the first levels."""
        rows = input_ids.eq(self._image_token).nonzero().squeeze(1)  # [image tokens]
        levels = stacked.unflatten(1, (-1, self.hidden_size))  # [image tokens, levels, hidden]

        def add_level(index: int, hidden: torch.Tensor) -> torch.Tensor:
            if index >= levels.shape[1]:
                return hidden
            return hidden.index_add(0, rows, levels[:, index].to(hidden.dtype))

        return add_level


def build_qwen3_vl(
    config: PretrainedConfig, folder: Path, dtype: torch.dtype, device: torch.device
) -> QwenVLForConditionalGeneration:
    return build_qwen_vl(config, folder, dtype, device, Qwen3VLForConditionalGeneration)
