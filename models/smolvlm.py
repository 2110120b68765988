"""SmolVLM and Idefics3: a SigLIP-style tower over an image's tiles, a pixel-shuffle
connector and our Llama decoder.

The processor cuts an image into square tiles plus a downscaled global image
(models/tile_processor.py); every tile of every new image of a step goes through
transformers' own vision module in one call. The connector folds each scale x scale
block of patch features into one token (the pixel shuffle) and projects it into the
decoder's space without a bias, so a tile becomes (side / patch)² / scale² tokens. In the
prompt, the tokens of consecutive tiles are separated by the tiles' row/column tags;
`forward` scatters the image rows over the image tokens only, as LLaVA does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer

from models.attention import KVCache
from models.attention_inputs import AttentionInputs
from models.checkpoint import CONFIG_FILE
from models.errors import ModelLoadError
from models.layers import PagedDecoderModel
from models.llama import LlamaDecoder
from models.llava import embed_with_images, no_init_weights
from models.qwen_vl import load_module
from models.weights import CheckpointWeights

VISION_TOWERS: dict[str, Any] = {  # by the checkpoint's model_type
    "smolvlm": SmolVLMVisionTransformer,
    "idefics3": Idefics3VisionTransformer,
}
TEXT_MODELS = ("llama",)
# Stored prefix -> canonical prefix: transformers 5 and 4 name these modules alike.
SMOLVLM_RENAMES = (
    ("model.text_model.", "text_model."),
    ("model.vision_model.", "vision_model."),
    ("model.connector.", "connector."),
)


def canonical_smolvlm_name(stored: str) -> str:
    for old, new in SMOLVLM_RENAMES:
        if stored.startswith(old):
            return new + stored[len(old) :]
    return stored


def pixel_shuffle(features: torch.Tensor, scale: int) -> torch.Tensor:
    """[tiles, side*side, C] -> [tiles, side*side / scale², C * scale²]: each scale x scale
    block of patches becomes one token, in the reference's channel order."""
    tiles, patches, channels = features.shape
    side = int(patches**0.5)
    grid = features.view(tiles, side, side // scale, channels * scale)
    grid = grid.permute(0, 2, 1, 3).reshape(
        tiles, side // scale, side // scale, channels * scale**2
    )
    return grid.permute(0, 2, 1, 3).reshape(tiles, patches // scale**2, channels * scale**2)


class SmolVLMForConditionalGeneration(PagedDecoderModel):
    def __init__(
        self,
        config: PretrainedConfig,
        decoder: LlamaDecoder,
        tower: torch.nn.Module,
        projection: torch.Tensor,  # [text hidden, vision hidden * scale²]
    ) -> None:
        self.decoder, self.tower, self.projection = decoder, tower, projection
        self.adopt_dims(decoder)
        vision = config.vision_config
        self.scale = int(config.scale_factor)
        self.patch_size = int(vision.patch_size)
        self.image_token_id = self._image_token = int(config.image_token_id)
        self.image_size = int(vision.image_size)  # a tile's side
        self.image_seq_length = (self.image_size // self.patch_size) ** 2 // self.scale**2

    def image_tokens(self, tensors: Mapping[str, Any]) -> int:
        """A tile's tokens times the image's tiles (the global image counts as one)."""
        pixels = tensors["pixel_values"]
        tiles = 1 if len(pixels.shape) == 3 else int(pixels.shape[0])
        return tiles * self.image_seq_length

    @torch.inference_mode()
    def encode_image_batch(
        self, images: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Every tile of every image in one tower call; per image [tiles * tile tokens, hidden]."""
        tiles = [_tiles(image["pixel_values"]) for image in images]
        pixels = torch.cat(tiles).to(device=self.device, dtype=self.dtype)  # [tiles, 3, S, S]
        # NOTE: no patch mask: one image's tiles all have the tile's size, never padding (the
        # reference masks only the padding of batches of images with different tile counts)
        features = self.tower(pixel_values=pixels).last_hidden_state  # [tiles, patches, C]
        tokens = F.linear(pixel_shuffle(features, self.scale), self.projection)
        per_image = tokens.split([len(t) for t in tiles])  # each [its tiles, tile tokens, hidden]
        return [embeds.reshape(-1, embeds.shape[-1]) for embeds in per_image]

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
            hidden = self.decoder.embed(input_ids)  # [T, hidden]
        else:
            hidden = embed_with_images(self.decoder, input_ids, self._image_token, image_embeds)
        return self.decoder.run(hidden, positions, attn_inputs, kv_cache)


def _tiles(pixel_values: torch.Tensor) -> torch.Tensor:
    """[tiles, 3, S, S]; one [3, S, S] image (the engine's warm-up) is one tile."""
    return pixel_values[None] if pixel_values.dim() == 3 else pixel_values


def _check_config(folder: Path, config: PretrainedConfig) -> None:
    path = folder / CONFIG_FILE
    if config.model_type not in VISION_TOWERS:
        raise ModelLoadError(path, f"model_type {config.model_type!r} unsupported")
    if config.text_config.model_type not in TEXT_MODELS:
        problem = f"text model {config.text_config.model_type!r} unsupported ({TEXT_MODELS})"
        raise ModelLoadError(path, problem)
    vision, scale = config.vision_config, int(config.scale_factor)
    side = vision.image_size // vision.patch_size
    if vision.image_size % vision.patch_size or side % scale:
        problem = f"tiles of {side} patches a side cannot be pixel-shuffled by {scale}"
        raise ModelLoadError(path, problem)


def _tied(config: PretrainedConfig) -> bool:
    text_tied = getattr(config.text_config, "tie_word_embeddings", False)
    return bool(getattr(config, "tie_word_embeddings", False) or text_tied)


def build_smolvlm(
    config: PretrainedConfig, folder: Path, dtype: torch.dtype, device: torch.device
) -> SmolVLMForConditionalGeneration:
    _check_config(folder, config)
    weights = CheckpointWeights(folder, rename=canonical_smolvlm_name)
    decoder = LlamaDecoder(
        config.text_config,
        weights,
        prefix="text_model.",
        lm_head_name="lm_head.weight",
        tied=_tied(config),
        dtype=dtype,
        device=device,
    )
    with no_init_weights():
        tower = VISION_TOWERS[config.model_type]._from_config(config.vision_config)
    load_module(tower, weights, "vision_model.")
    fan_in = config.vision_config.hidden_size * int(config.scale_factor) ** 2
    projection = weights.take(
        "connector.modality_projection.proj.weight",
        (config.text_config.hidden_size, fan_in),
        dtype,
        device,
    )
    weights.check_all_used()
    return SmolVLMForConditionalGeneration(
        config, decoder, tower.to(device, dtype).eval(), projection
    )
