"""LLaVA: a CLIP or SigLIP vision tower, a two-layer projector and a Llama-family decoder.

The vision tower is transformers' own module (it runs once per image and needs no
KV cache); the decoder is ours, on the paged cache. In `forward`, the embedding
rows of image placeholder tokens are replaced, in order, by the rows of
`image_embeds` that `encode_images` produced.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import AutoModel, PretrainedConfig

from models.attention import KVCache
from models.attention_inputs import AttentionInputs
from models.checkpoint import CONFIG_FILE, read_json
from models.errors import ModelLoadError
from models.layers import PagedDecoderModel, activation
from models.linear import Product
from models.llama import LlamaDecoder
from models.weights import CheckpointWeights

VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")
TEXT_MODELS = ("llama", "qwen2")
SELECT_STRATEGIES = ("default", "full")
# Stored prefix -> canonical prefix; covers transformers v5 module names and llava-hf's.
LLAVA_RENAMES = (
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("vision_tower.vision_model.", "vision_tower."),
)


def canonical_llava_name(stored: str) -> str:
    for old, new in LLAVA_RENAMES:
        if stored.startswith(old):
            stored = new + stored[len(old) :]
    return stored


def no_init_weights() -> Any:
    """transformers' context that skips random init of a module about to be overwritten."""
    try:
        module = importlib.import_module("transformers.initialization")
    except ImportError:  # transformers < 5
        module = importlib.import_module("transformers.modeling_utils")
    return module.no_init_weights()


def load_vision_tower(
    config: PretrainedConfig, weights: CheckpointWeights, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """transformers' vision model for `config`, filled from the `vision_tower.*` tensors."""
    if config.model_type not in VISION_TOWERS:
        supported = ", ".join(VISION_TOWERS)
        problem = f"vision tower {config.model_type!r} unsupported ({supported})"
        raise ModelLoadError(weights.folder / CONFIG_FILE, problem)
    with no_init_weights():
        tower = AutoModel.from_config(config)
    stored = weights.take_prefix("vision_tower.")
    state = {}
    for key, param in tower.state_dict().items():
        name = key.removeprefix("vision_model.")  # transformers < 5 nests the tower one level
        tensor = stored.pop(name, None)
        if tensor is None or tensor.shape != param.shape:
            found = "missing" if tensor is None else f"shape {tuple(tensor.shape)}"
            problem = f"vision tower tensor {name!r} {found}, expected {tuple(param.shape)}"
            raise ModelLoadError(weights.folder, problem)
        state[key] = tensor
    if stored:
        raise ModelLoadError(
            weights.folder, f"unexpected vision tower tensors: {sorted(stored)[:5]}"
        )
    tower.load_state_dict(state, strict=True)
    return tower.to(device=device, dtype=dtype).eval()


class LlavaForConditionalGeneration(PagedDecoderModel):
    def __init__(
        self,
        config: PretrainedConfig,
        decoder: LlamaDecoder,
        tower: torch.nn.Module,
        projector: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
        image_seq_length: int,
    ) -> None:
        self.decoder, self.tower, self.projector = decoder, tower, projector
        self.adopt_dims(decoder)
        self.act: Callable[[torch.Tensor], torch.Tensor] = activation(config.projector_hidden_act)
        self.projector_product: Product = F.linear  # LoRA adapters wrap it (models/lora)
        self.feature_layers = _feature_layers(config.vision_feature_layer)
        self.drop_first_token = config.vision_feature_select_strategy == "default"
        self.image_token_id = self._image_token = int(config.image_token_id)
        self.image_seq_length = image_seq_length
        self.image_size = int(config.vision_config.image_size)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, image_seq_length, hidden], projected into the decoder's space."""
        pixels = pixel_values.to(device=self.device, dtype=self.dtype)
        states = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        selected = [states[layer] for layer in self.feature_layers]  # each [B, patches(+1), C]
        if self.drop_first_token:
            selected = [features[:, 1:] for features in selected]
        features = torch.cat(selected, dim=-1)  # [B, image_seq_length, C * len(layers)]
        w1, b1, w2, b2 = self.projector
        project = self.projector_product
        return project(self.act(project(features, w1, b1)), w2, b2)

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
        return self.decoder.run(hidden, positions, attn_inputs, kv_cache)


class TextEmbedder(Protocol):
    vocab_size: int

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...


def embed_with_images(
    decoder: TextEmbedder, input_ids: torch.Tensor, image_token: int, image_embeds: torch.Tensor
) -> torch.Tensor:  # [T, hidden]
    """The decoder's embeddings of `input_ids` [T], each image token's row replaced, in
    order, by the next row of `image_embeds`; an image token id outside the vocabulary
    is embedded as id 0 first, as transformers does."""
    is_image = input_ids.eq(image_token)  # [T]
    if image_token >= decoder.vocab_size:
        input_ids = input_ids.masked_fill(is_image, 0)
    hidden = decoder.embed(input_ids)  # [T, hidden]
    count = int(is_image.sum())
    if image_embeds.shape[0] != count:
        raise ValueError(f"{count} image tokens but {image_embeds.shape[0]} image embeddings")
    return hidden.masked_scatter(is_image[:, None], image_embeds.to(hidden.dtype))


def _feature_layers(layer: int | list[int]) -> list[int]:
    return [layer] if isinstance(layer, int) else [int(i) for i in layer]


def image_seq_length_of(folder: Path, config: PretrainedConfig) -> int:
    """Tokens one image becomes; must agree with an explicit `image_seq_length` in config.json."""
    vision = config.vision_config
    count = (vision.image_size // vision.patch_size) ** 2
    count += int(vision.model_type == "clip_vision_model")  # CLIP adds a class token
    count -= int(config.vision_feature_select_strategy == "default")  # ... which 'default' drops
    stated = read_json(folder / CONFIG_FILE).get("image_seq_length")
    if stated is not None and stated != count:
        problem = (
            f"image_seq_length is {stated} but the vision tower gives {count} tokens per image"
        )
        raise ModelLoadError(folder / CONFIG_FILE, problem)
    return count


def _projector(
    config: PretrainedConfig, weights: CheckpointWeights, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    text, vision = config.text_config.hidden_size, config.vision_config.hidden_size
    fan_in = vision * len(_feature_layers(config.vision_feature_layer))
    has_bias = bool(getattr(config, "multimodal_projector_bias", True))

    def take(name: str, *shape: int) -> torch.Tensor:
        return weights.take(f"multi_modal_projector.{name}", shape, dtype, device)

    return (
        take("linear_1.weight", text, fan_in),
        take("linear_1.bias", text) if has_bias else None,
        take("linear_2.weight", text, text),
        take("linear_2.bias", text) if has_bias else None,
    )


def _check_config(folder: Path, config: PretrainedConfig) -> None:
    path = folder / CONFIG_FILE
    if config.text_config.model_type not in TEXT_MODELS:
        problem = f"text model {config.text_config.model_type!r} unsupported ({TEXT_MODELS})"
        raise ModelLoadError(path, problem)
    if config.vision_feature_select_strategy not in SELECT_STRATEGIES:
        strategy = config.vision_feature_select_strategy
        raise ModelLoadError(path, f"vision_feature_select_strategy {strategy!r} unsupported")


def build_llava(
    config: PretrainedConfig, folder: Path, dtype: torch.dtype, device: torch.device
) -> LlavaForConditionalGeneration:
    _check_config(folder, config)
    text_config = config.text_config
    weights = CheckpointWeights(folder, rename=canonical_llava_name)
    tied = bool(getattr(config, "tie_word_embeddings", False) or text_config.tie_word_embeddings)
    decoder = LlamaDecoder(
        text_config,
        weights,
        prefix="language_model.",
        lm_head_name="lm_head.weight",
        tied=tied,
        dtype=dtype,
        device=device,
        qkv_bias_always=text_config.model_type == "qwen2",
    )
    tower = load_vision_tower(config.vision_config, weights, dtype, device)
    projector = _projector(config, weights, dtype, device)
    weights.check_all_used()
    return LlavaForConditionalGeneration(
        config, decoder, tower, projector, image_seq_length_of(folder, config)
    )
