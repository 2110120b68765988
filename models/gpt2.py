"""GPT-2 on the paged KV cache, weights read by their Hugging Face names.

GPT-2 stores its projections as Conv1D ([in, out]); they are transposed once at
load time so every projection is an [out, in] product (models/linear.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from models.attention import KVCache, paged_attention
from models.attention_inputs import AttentionInputs
from models.fused_decode import FusedDecodeCache, build_gpt2_decode
from models.layers import PagedDecoderModel, activation, product_for
from models.linear import Product
from models.weights import CheckpointWeights

# Causal-mask buffers that old GPT-2 checkpoints store alongside the weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _gpt2_name(stored: str) -> str:
    """Checkpoints name the body `transformer.*` (GPT2LMHeadModel) or leave it bare."""
    return stored.removeprefix("transformer.")


@dataclass
class GPT2LayerWeights:
    ln_1: tuple[torch.Tensor, torch.Tensor]  # weight, bias [hidden]
    qkv: tuple[torch.Tensor, torch.Tensor]  # [3 * hidden, hidden], [3 * hidden]
    attn_out: tuple[torch.Tensor, torch.Tensor]  # [hidden, hidden], [hidden]
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc_in: tuple[torch.Tensor, torch.Tensor]  # [inner, hidden], [inner]
    fc_out: tuple[torch.Tensor, torch.Tensor]  # [hidden, inner], [hidden]


class GPT2Layer:
    def __init__(
        self,
        index: int,
        weights: GPT2LayerWeights,
        num_heads: int,
        eps: float,
        scale: float,
        act: Callable[[torch.Tensor], torch.Tensor],
        product: Product,
    ) -> None:
        self.w, self.num_heads, self.eps, self.scale, self.act = weights, num_heads, eps, scale, act
        self.index, self.product = index, product
        self.hidden_size = weights.ln_1[0].shape[0]
        self.head_dim = self.hidden_size // num_heads

    def forward(
        self, hidden: torch.Tensor, attn_inputs: AttentionInputs, cache: KVCache
    ) -> torch.Tensor:  # [T, hidden]
        num_tokens = hidden.shape[0]
        normed = F.layer_norm(hidden, (self.hidden_size,), *self.w.ln_1, self.eps)
        product = self.product
        qkv = product(normed, *self.w.qkv).view(num_tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(1)  # each [T, heads, D]
        attended = paged_attention(query, key, value, cache, attn_inputs, self.scale, self.index)
        hidden = hidden + product(attended, *self.w.attn_out)
        normed = F.layer_norm(hidden, (self.hidden_size,), *self.w.ln_2, self.eps)
        return hidden + product(self.act(product(normed, *self.w.fc_in)), *self.w.fc_out)


class GPT2LMHeadModel(PagedDecoderModel):
    layers: list[GPT2Layer]
    fused_decode: FusedDecodeCache

    def __init__(
        self,
        config: PretrainedConfig,
        weights: CheckpointWeights,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.hidden_size, self.vocab_size = config.n_embd, config.vocab_size
        self.num_layers = config.n_layer
        self.num_kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.max_positions, self.dtype, self.device = config.n_positions, dtype, device
        self.eps = config.layer_norm_epsilon
        self._weights, self._inner = weights, config.n_inner or 4 * config.n_embd
        self.wte = self._take("wte.weight", self.vocab_size, self.hidden_size)
        self.wpe = self._take("wpe.weight", self.max_positions, self.hidden_size)
        act = activation(config.activation_function)
        weights_of_layers = [self._layer(i) for i in range(self.num_layers)]
        self.ln_f = self._norm("ln_f")
        self.lm_head = self._lm_head(bool(getattr(config, "tie_word_embeddings", True)))
        self.product = product_for(weights_of_layers, self.lm_head)
        self.layers = [
            GPT2Layer(i, w, config.n_head, self.eps, _scale(config, i), act, self.product)
            for i, w in enumerate(weights_of_layers)
        ]
        build = partial(build_gpt2_decode, num_heads=config.n_head, eps=self.eps)
        self.fused_decode = FusedDecodeCache(self.layers, build, dtype, device)

    def _take(self, name: str, *shape: int) -> torch.Tensor:
        return self._weights.take(name, shape, self.dtype, self.device)

    def _norm(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self._take(f"{prefix}.weight", self.hidden_size),
            self._take(f"{prefix}.bias", self.hidden_size),
        )

    def _conv1d(self, prefix: str, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self._take(f"{prefix}.weight", fan_in, fan_out).t().contiguous()  # [out, in]
        return weight, self._take(f"{prefix}.bias", fan_out)

    def _layer(self, index: int) -> GPT2LayerWeights:
        p, hidden, inner = f"h.{index}.", self.hidden_size, self._inner
        return GPT2LayerWeights(
            ln_1=self._norm(f"{p}ln_1"),
            qkv=self._conv1d(f"{p}attn.c_attn", hidden, 3 * hidden),
            attn_out=self._conv1d(f"{p}attn.c_proj", hidden, hidden),
            ln_2=self._norm(f"{p}ln_2"),
            fc_in=self._conv1d(f"{p}mlp.c_fc", hidden, inner),
            fc_out=self._conv1d(f"{p}mlp.c_proj", inner, hidden),
        )

    def _lm_head(self, tied: bool) -> torch.Tensor:
        if not tied:
            return self._take("lm_head.weight", self.vocab_size, self.hidden_size)
        if self._weights.has("lm_head.weight"):
            self._weights.skip("lm_head.weight")
        return self.wte

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, hidden]
        if image_embeds is not None:
            raise ValueError("this model takes no images")
        hidden = F.embedding(input_ids, self.wte) + F.embedding(positions, self.wpe)
        fused = self.fused_decode.for_step(hidden, attn_inputs)
        if fused is not None:
            hidden = fused.run(hidden, None, attn_inputs, kv_cache)
        else:
            for layer, cache in zip(self.layers, kv_cache, strict=True):
                hidden = layer.forward(hidden, attn_inputs, cache)
        return F.layer_norm(hidden, (self.hidden_size,), *self.ln_f, self.eps)


def _scale(config: PretrainedConfig, layer_index: int) -> float:
    scale = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= layer_index + 1
    return scale


def build_gpt2(
    config: PretrainedConfig, folder: Path, dtype: torch.dtype, device: torch.device
) -> GPT2LMHeadModel:
    weights = CheckpointWeights(folder, rename=_gpt2_name)
    for name in weights.names():
        if name.endswith(IGNORED_SUFFIXES):
            weights.skip(name)
    model = GPT2LMHeadModel(config, weights, dtype, device)
    weights.check_all_used()
    return model
