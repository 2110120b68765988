"""Gemma 3's text decoder (`Gemma3ForCausalLM`) on the paged KV cache.

What sets it apart from Llama: the embeddings are scaled by sqrt(hidden) (in the
model's dtype, as transformers does), every RMSNorm multiplies by (1 + weight), q and k
are RMS-normed per head, attention and the gelu-tanh MLP each have a norm before and
after, the attention scale is `query_pre_attn_scalar ** -0.5`, and the layers alternate
between local ones (sliding window, rotary base `rope_local_base_freq`) and global ones
(full attention, `rope_theta` and the global rope scaling), as `layer_types` says.

The local layers' window is planned into the step's attention inputs (the model's
`sliding_window`, models/attention_inputs.py). Every layer keeps every token's K/V: all
layers share one block table, and a block that every local layer has left behind still
holds the global layers' K/V, so it cannot be freed or reused; the cache is sized as for
a model of global layers only, with no saving from the window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from models.attention import KVCache, paged_attention
from models.attention_inputs import AttentionInputs
from models.errors import ModelLoadError
from models.layers import PagedDecoderModel, TextOnlyModel, activation, product_for
from models.linear import Product
from models.llama import LlamaDims, LlamaLayerWeights, _LlamaWeightReader, _output_layer
from models.rope import RotaryEmbedding
from models.weights import CheckpointWeights

LAYER_TYPES = ("sliding_attention", "full_attention")
CosSin = tuple[torch.Tensor, torch.Tensor]


def gemma_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm; `scale` is (1 + weight) in float32, applied before the cast back,
    as transformers computes it."""
    return F.rms_norm(x.float(), scale.shape, scale, eps).to(x.dtype)


def gemma_head_norm(heads: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The QK-norm: Gemma's RMSNorm over the last dim of [T, heads, D], `scale` [heads, D]."""
    return (F.rms_norm(heads.float(), heads.shape[-1:], None, eps) * scale).to(heads.dtype)


def _norm_scale(weight: torch.Tensor) -> torch.Tensor:
    return 1.0 + weight.float()


@dataclass
class Gemma3Norms:
    """A layer's four norms as (1 + weight) in float32 (the QK-norm's per head, [H + KV, D])."""

    input: torch.Tensor
    qk: torch.Tensor
    post_attention: torch.Tensor
    pre_feedforward: torch.Tensor
    post_feedforward: torch.Tensor


class Gemma3Layer:
    def __init__(
        self,
        index: int,
        dims: LlamaDims,
        weights: LlamaLayerWeights,
        norms: Gemma3Norms,
        config: PretrainedConfig,
        product: Product,
    ) -> None:
        self.index, self.dims, self.product = index, dims, product
        self.w, self.norms = weights, norms
        self.act = activation(config.hidden_activation)
        self.layer_type = config.layer_types[index]
        self.sliding = self.layer_type == "sliding_attention"
        self.scale = float(config.query_pre_attn_scalar) ** -0.5
        self.q_and_k_width = (dims.num_heads + dims.num_kv_heads) * dims.head_dim

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        rope: RotaryEmbedding,
        cos_sin: CosSin,
        attn_inputs: AttentionInputs,
        cache: KVCache,
    ) -> torch.Tensor:
        eps, norms = self.dims.eps, self.norms
        attended = self._attention(
            gemma_rms_norm(hidden, norms.input, eps), rope, cos_sin, attn_inputs, cache
        )
        hidden = hidden + gemma_rms_norm(attended, norms.post_attention, eps)
        fed = self._mlp(gemma_rms_norm(hidden, norms.pre_feedforward, eps))
        return hidden + gemma_rms_norm(fed, norms.post_feedforward, eps)

    def _attention(
        self,
        normed: torch.Tensor,  # [T, hidden]
        rope: RotaryEmbedding,
        cos_sin: CosSin,
        attn_inputs: AttentionInputs,
        cache: KVCache,
    ) -> torch.Tensor:
        dims, num_tokens = self.dims, normed.shape[0]
        qkv = self.product(normed, self.w.qkv_weight, self.w.qkv_bias)  # [T, (H + 2 * KV) * D]
        q_and_k = qkv[:, : self.q_and_k_width].view(num_tokens, -1, dims.head_dim)
        q_and_k = rope.apply(gemma_head_norm(q_and_k, self.norms.qk, dims.eps), *cos_sin)
        query, key = q_and_k[:, : dims.num_heads], q_and_k[:, dims.num_heads :]
        value = qkv[:, self.q_and_k_width :].view(num_tokens, dims.num_kv_heads, dims.head_dim)
        attended = paged_attention(
            query, key, value, cache, attn_inputs, self.scale, self.index, self.sliding
        )
        return self.product(attended, self.w.o_weight, self.w.o_bias)  # [T, hidden]

    def _mlp(self, normed: torch.Tensor) -> torch.Tensor:
        gate_up = self.product(normed, self.w.gate_up_weight, self.w.gate_up_bias)  # [T, 2 * inter]
        gate, up = gate_up.chunk(2, dim=-1)
        return self.product(self.act(gate) * up, self.w.down_weight, self.w.down_bias)


class Gemma3Decoder(PagedDecoderModel):
    """Embeddings, layers and final norm of a Gemma 3 text model, plus its output layer."""

    layers: list[Gemma3Layer]

    def __init__(
        self,
        config: PretrainedConfig,
        weights: CheckpointWeights,
        *,
        prefix: str,
        tied: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.dims = dims = LlamaDims.from_config(config, qk_norm=True)
        self.num_layers, self.num_kv_heads, self.head_dim = (
            dims.num_layers,
            dims.num_kv_heads,
            dims.head_dim,
        )
        self.hidden_size, self.vocab_size = dims.hidden_size, dims.vocab_size
        self.max_positions, self.dtype, self.device = dims.max_positions, dtype, device
        self.sliding_window = _sliding_window(config)
        reader = _LlamaWeightReader(weights, dims, prefix, dtype, device)
        self.embed_tokens = reader.take("embed_tokens.weight", dims.vocab_size, dims.hidden_size)
        self.embed_scale = torch.tensor(dims.hidden_size**0.5).to(dtype)
        weights_of_layers = [reader.layer(i) for i in range(dims.num_layers)]
        norms = [_layer_norms(reader, i, w) for i, w in enumerate(weights_of_layers)]
        # the QK-norm lives in `norms` now: no 2-D tensor left for int8 to take for a matrix
        weights_of_layers = [replace(w, qk_norm=None) for w in weights_of_layers]
        self.norm = _norm_scale(reader.take("norm.weight", dims.hidden_size))
        self.lm_head = _output_layer(
            weights, "lm_head.weight", self.embed_tokens, tied, dtype, device
        )
        self.product = product_for(weights_of_layers, self.lm_head)
        self.layers = [
            Gemma3Layer(i, dims, w, n, config, self.product)
            for i, (w, n) in enumerate(zip(weights_of_layers, norms, strict=True))
        ]
        self.ropes = {
            layer_type: RotaryEmbedding(
                config, dims.head_dim, dims.max_positions, dtype, device, layer_type
            )
            for layer_type in sorted(set(config.layer_types))
        }

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens) * self.embed_scale  # [T, hidden]

    def run(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T]
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
    ) -> torch.Tensor:
        """The layers over a flat batch; returns final-normed hidden states [T, hidden]."""
        cos_sin = {kind: rope.lookup(positions) for kind, rope in self.ropes.items()}
        for layer, cache in zip(self.layers, kv_cache, strict=True):
            rope, layer_cos_sin = self.ropes[layer.layer_type], cos_sin[layer.layer_type]
            hidden = layer.forward(hidden, rope, layer_cos_sin, attn_inputs, cache)
        return gemma_rms_norm(hidden, self.norm, self.dims.eps)


def _layer_norms(reader: _LlamaWeightReader, index: int, weights: LlamaLayerWeights) -> Gemma3Norms:
    """The layer's norms; the Llama reader took the first two under Llama's names, which
    Gemma 3 shares (input_layernorm, post_attention_layernorm)."""
    assert weights.qk_norm is not None
    hidden = reader.dims.hidden_size
    return Gemma3Norms(
        input=_norm_scale(weights.input_norm),
        qk=_norm_scale(weights.qk_norm),
        post_attention=_norm_scale(weights.post_norm),
        pre_feedforward=_norm_scale(
            reader.take(f"layers.{index}.pre_feedforward_layernorm.weight", hidden)
        ),
        post_feedforward=_norm_scale(
            reader.take(f"layers.{index}.post_feedforward_layernorm.weight", hidden)
        ),
    )


def _sliding_window(config: PretrainedConfig) -> int | None:
    """The local layers' window; None when every layer is global."""
    if "sliding_attention" not in config.layer_types:
        return None
    return int(config.sliding_window)


def check_text_config(config: PretrainedConfig, path: Path) -> None:
    """Refuse what the decoder does not implement, rather than serve it wrong."""
    unknown = set(config.layer_types) - set(LAYER_TYPES)
    if unknown:
        raise ModelLoadError(path, f"layer types {sorted(unknown)} unsupported ({LAYER_TYPES})")
    if "sliding_attention" in config.layer_types and not config.sliding_window:
        raise ModelLoadError(path, "sliding_attention layers need a sliding_window")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is not None:
            raise ModelLoadError(path, f"{name} is not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelLoadError(
            path, "use_bidirectional_attention (embedding models) is not supported"
        )


class Gemma3ForCausalLM(TextOnlyModel):
    """Gemma3ForCausalLM: the text-only paged model."""

    def __init__(self, decoder: Gemma3Decoder) -> None:
        self.decoder = decoder
        self.adopt_dims(decoder)
        self.sliding_window = decoder.sliding_window


def build_gemma3_text(
    config: PretrainedConfig,
    folder: Path,
    dtype: torch.dtype,
    device: torch.device,
    weights: CheckpointWeights | None = None,
) -> Gemma3ForCausalLM:
    """`weights` default to the folder's safetensors (a GGUF file's are given)."""
    check_text_config(config, folder / "config.json" if weights is None else folder)
    weights = weights or CheckpointWeights(folder)
    decoder = Gemma3Decoder(
        config,
        weights,
        prefix="model.",
        tied=bool(getattr(config, "tie_word_embeddings", True)),
        dtype=dtype,
        device=device,
    )
    weights.check_all_used()
    return Gemma3ForCausalLM(decoder)
