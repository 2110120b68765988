"""Gemma 3 with images (`Gemma3ForConditionalGeneration`): a SigLIP tower, the pooled
projector and the Gemma 3 text decoder (models/gemma3.py).

The tower is transformers' own module, read strictly under the checkpoint's names
(`load_vision_tower`, shared with LLaVA). The projector average-pools the tower's patch
grid down to `mm_tokens_per_image` tokens, RMS-norms them ((1 + weight), as every Gemma
norm) and projects them into the decoder's width; image embeddings are not scaled by
sqrt(hidden) as text embeddings are.

Inside one image's run of tokens attention goes both ways, as transformers does when it
is given `token_type_ids` (which its processor returns); so a prefill chunk must hold the
rest of any image it starts (`image_spans_in_one_chunk`, a rule of the scheduler).
Pan-and-scan (extra crops of a large image) is not supported: an image is one crop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from models.attention import KVCache
from models.attention_inputs import AttentionInputs, with_bidirectional_spans
from models.checkpoint import CONFIG_FILE
from models.errors import ModelLoadError
from models.gemma3 import Gemma3Decoder, check_text_config, gemma_rms_norm
from models.layers import PagedDecoderModel
from models.llava import canonical_llava_name, embed_with_images, load_vision_tower
from models.weights import CheckpointWeights


class Gemma3Projector:
    """Pools [B, patches, C] tower features to [B, tokens, C], norms and projects them."""

    def __init__(
        self,
        config: PretrainedConfig,
        weights: CheckpointWeights,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        vision = config.vision_config
        width, hidden = vision.hidden_size, config.text_config.hidden_size
        self.patches_per_side = vision.image_size // vision.patch_size
        self.kernel = self.patches_per_side // int(config.mm_tokens_per_image**0.5)
        self.eps = vision.layer_norm_eps
        name = "multi_modal_projector."
        norm = weights.take(name + "mm_soft_emb_norm.weight", (width,), dtype, device)
        self.norm_scale = 1.0 + norm.float()
        self.projection = weights.take(
            name + "mm_input_projection_weight", (width, hidden), dtype, device
        )

    def __call__(self, features: torch.Tensor) -> torch.Tensor:  # [B, patches, C]
        batch, _, width = features.shape
        side = self.patches_per_side
        grid = features.transpose(1, 2).reshape(batch, width, side, side)  # [B, C, side, side]
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        normed = gemma_rms_norm(pooled, self.norm_scale, self.eps)  # [B, tokens, C]
        return torch.matmul(normed, self.projection).type_as(features)  # [B, tokens, hidden]


class Gemma3ForConditionalGeneration(PagedDecoderModel):
    image_spans_in_one_chunk = True

    def __init__(
        self,
        config: PretrainedConfig,
        decoder: Gemma3Decoder,
        tower: torch.nn.Module,
        projector: Gemma3Projector,
    ) -> None:
        self.decoder, self.tower, self.projector = decoder, tower, projector
        self.adopt_dims(decoder)
        self.sliding_window = decoder.sliding_window
        self.image_token_id = self._image_token = int(config.image_token_id)
        self.image_seq_length = int(config.mm_tokens_per_image)
        self.image_size = int(config.vision_config.image_size)
        self.begin_image_id, self.end_image_id = int(config.boi_token_id), int(config.eoi_token_id)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, mm_tokens_per_image, hidden], projected into the decoder's space."""
        pixels = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.projector(self.tower(pixel_values=pixels).last_hidden_state)

    def image_prompt(self, tokenizer: Any) -> tuple[str, str]:
        """What the chat template writes for an image, and what the checkpoint's processor
        writes instead, with one image token (the prompt builder repeats it)."""
        begin, end, image = tokenizer.convert_ids_to_tokens(
            [self.begin_image_id, self.end_image_id, self.image_token_id]
        )
        return begin, f"\n\n{begin}{image}{end}\n\n"

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
        image_embeds: torch.Tensor | None = None,  # [image tokens in input_ids, hidden]
    ) -> torch.Tensor:  # [T, hidden]
        if image_embeds is None:
            hidden = self.decoder.embed(input_ids)
        else:
            hidden = embed_with_images(self.decoder, input_ids, self._image_token, image_embeds)
            attn_inputs = with_bidirectional_spans(attn_inputs, input_ids.eq(self._image_token))
        return self.decoder.run(hidden, positions, attn_inputs, kv_cache)


def _check_config(folder: Path, config: PretrainedConfig) -> None:
    path = folder / CONFIG_FILE
    check_text_config(config.text_config, path)
    vision = config.vision_config
    patches_per_side = vision.image_size // vision.patch_size
    tokens_per_side = int(config.mm_tokens_per_image**0.5)
    if tokens_per_side**2 != config.mm_tokens_per_image or patches_per_side % tokens_per_side:
        count = config.mm_tokens_per_image
        problem = f"mm_tokens_per_image {count} cannot pool a {patches_per_side}² patch grid"
        raise ModelLoadError(path, problem)


def build_gemma3_vl(
    config: PretrainedConfig, folder: Path, dtype: torch.dtype, device: torch.device
) -> Gemma3ForConditionalGeneration:
    _check_config(folder, config)
    text_config = config.text_config
    weights = CheckpointWeights(folder, rename=canonical_llava_name)
    tied = bool(getattr(config, "tie_word_embeddings", True))
    decoder = Gemma3Decoder(
        text_config, weights, prefix="language_model.", tied=tied, dtype=dtype, device=device
    )
    tower = load_vision_tower(config.vision_config, weights, dtype, device)
    projector = Gemma3Projector(config, weights, dtype, device)
    weights.check_all_used()
    return Gemma3ForConditionalGeneration(config, decoder, tower, projector)
