"""Llama-family decoders (Llama, Qwen2-style q/k/v bias, Qwen3's QK-norm) on the paged KV cache.

Weights are read by their Hugging Face names. q/k/v are fused into one matrix and
gate/up into another at load time, so a layer runs three big matmuls plus the
output projection, and rotary embeddings are applied to q and k in one go.
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
from models.errors import ModelLoadError
from models.fused_decode import FusedDecodeCache, build_llama_decode
from models.layers import PagedDecoderModel, TextOnlyModel, activation, product_for, rms_norm
from models.linear import Product
from models.rope import RotaryEmbedding
from models.weights import CheckpointWeights

# Tensors some checkpoints store that are recomputed here.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
GATE_UP = ("gate", "up")
# Called with a layer's index and output; returns what the next layer reads (Qwen3-VL's
# DeepStack adds visual features to the first layers' outputs at the image rows).
AfterLayer = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LlamaDims:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    max_positions: int
    eps: float
    qkv_bias: bool  # Llama's attention_bias and Qwen2 both bias q/k/v
    o_bias: bool  # only Llama's attention_bias biases the output projection
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head's q and k before the rotary embedding

    @classmethod
    def from_config(
        cls, config: PretrainedConfig, *, qkv_bias_always: bool = False, qk_norm: bool = False
    ) -> LlamaDims:
        num_heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            hidden_size=config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            eps=config.rms_norm_eps,
            qkv_bias=attention_bias or qkv_bias_always,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=qk_norm,
        )


@dataclass
class LlamaLayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv_weight: torch.Tensor  # [(H + 2 * KV) * D, hidden]
    qkv_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None  # [H + KV, D]: q_norm's weight for every query head, then k_norm's
    o_weight: torch.Tensor  # [hidden, H * D]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [hidden]
    gate_up_weight: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down_weight: torch.Tensor  # [hidden, intermediate]
    down_bias: torch.Tensor | None


class LlamaLayer:
    def __init__(
        self, index: int, dims: LlamaDims, weights: LlamaLayerWeights, act: str, product: Product
    ) -> None:
        self.index, self.dims, self.w, self.product = index, dims, weights, product
        self.act = activation(act)
        self.q_and_k_width = (dims.num_heads + dims.num_kv_heads) * dims.head_dim
        self.scale = dims.head_dim**-0.5

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        rope: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attn_inputs: AttentionInputs,
        cache: KVCache,
    ) -> torch.Tensor:
        hidden = hidden + self._attention(hidden, rope, cos_sin, attn_inputs, cache)
        return hidden + self._mlp(hidden)

    def _attention(
        self,
        hidden: torch.Tensor,
        rope: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attn_inputs: AttentionInputs,
        cache: KVCache,
    ) -> torch.Tensor:
        dims, num_tokens = self.dims, hidden.shape[0]
        normed = rms_norm(hidden, self.w.input_norm, dims.eps)
        qkv = self.product(normed, self.w.qkv_weight, self.w.qkv_bias)  # [T, (H + 2 * KV) * D]
        q_and_k = qkv[:, : self.q_and_k_width].view(num_tokens, -1, dims.head_dim)
        if self.w.qk_norm is not None:
            q_and_k = head_rms_norm(q_and_k, self.w.qk_norm, dims.eps)
        q_and_k = rope.apply(q_and_k, *cos_sin)  # [T, H + KV, D]
        query, key = q_and_k[:, : dims.num_heads], q_and_k[:, dims.num_heads :]
        value = qkv[:, self.q_and_k_width :].view(num_tokens, dims.num_kv_heads, dims.head_dim)
        attended = paged_attention(query, key, value, cache, attn_inputs, self.scale, self.index)
        return self.product(attended, self.w.o_weight, self.w.o_bias)  # [T, hidden]

    def _mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = rms_norm(hidden, self.w.post_norm, self.dims.eps)
        gate_up = self.product(normed, self.w.gate_up_weight, self.w.gate_up_bias)  # [T, 2 * inter]
        gate, up = gate_up.chunk(2, dim=-1)
        return self.product(self.act(gate) * up, self.w.down_weight, self.w.down_bias)


def head_rms_norm(heads: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of [T, heads, D] with a per-head weight [heads, D]; the
    statistics in float32, as Qwen3's norm computes them."""
    normed = F.rms_norm(heads.float(), heads.shape[-1:], None, eps)
    return normed.to(heads.dtype) * weight


class LlamaDecoder(PagedDecoderModel):
    """Embeddings, layers and final norm of a Llama-family text model, plus its output layer."""

    layers: list[LlamaLayer]
    fused_decode: FusedDecodeCache

    def __init__(
        self,
        config: PretrainedConfig,
        weights: CheckpointWeights,
        *,
        prefix: str,
        lm_head_name: str,
        tied: bool,
        dtype: torch.dtype,
        device: torch.device,
        qkv_bias_always: bool = False,
        qk_norm: bool = False,
    ) -> None:
        self.dims = dims = LlamaDims.from_config(
            config, qkv_bias_always=qkv_bias_always, qk_norm=qk_norm
        )
        self.num_layers, self.num_kv_heads, self.head_dim = (
            dims.num_layers,
            dims.num_kv_heads,
            dims.head_dim,
        )
        self.hidden_size, self.vocab_size = dims.hidden_size, dims.vocab_size
        self.max_positions, self.dtype, self.device = dims.max_positions, dtype, device
        loader = _LlamaWeightReader(weights, dims, prefix, dtype, device)
        self.embed_tokens = loader.take("embed_tokens.weight", dims.vocab_size, dims.hidden_size)
        act = getattr(config, "hidden_act", "silu")
        weights_of_layers = [loader.layer(i) for i in range(dims.num_layers)]
        self.norm = loader.take("norm.weight", dims.hidden_size)
        self.lm_head = _output_layer(weights, lm_head_name, self.embed_tokens, tied, dtype, device)
        self.product = product_for(weights_of_layers, self.lm_head)
        self.layers = [
            LlamaLayer(i, dims, w, act, self.product) for i, w in enumerate(weights_of_layers)
        ]
        self.rope = RotaryEmbedding(config, dims.head_dim, dims.max_positions, dtype, device)
        build = partial(build_llama_decode, num_heads=dims.num_heads, eps=dims.eps)
        self.fused_decode = FusedDecodeCache(self.layers, build, dtype, device)
        for name in weights.names():
            if name.endswith(IGNORED_SUFFIXES):
                weights.skip(name)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)  # [T, hidden]

    def run(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T]
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
        after_layer: AfterLayer | None = None,
    ) -> torch.Tensor:
        """The layers over a flat batch; returns final-normed hidden states [T, hidden]."""
        cos_sin = self.rope.lookup(positions)
        fused = self.fused_decode.for_step(hidden, attn_inputs) if after_layer is None else None
        if fused is not None:
            hidden = fused.run(hidden, cos_sin, attn_inputs, kv_cache)
            return rms_norm(hidden, self.norm, self.dims.eps)
        for layer, cache in zip(self.layers, kv_cache, strict=True):
            hidden = layer.forward(hidden, self.rope, cos_sin, attn_inputs, cache)
            if after_layer is not None:
                hidden = after_layer(layer.index, hidden)
        return rms_norm(hidden, self.norm, self.dims.eps)


def _output_layer(
    weights: CheckpointWeights,
    name: str,
    embed_tokens: torch.Tensor,
    tied: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    if tied:
        if weights.has(name):
            weights.skip(name)  # some tied checkpoints also store the shared matrix
        return embed_tokens
    return weights.take(name, embed_tokens.shape, dtype, device)


class _LlamaWeightReader:
    """Reads one decoder's tensors under `prefix` and fuses the per-layer matrices."""

    def __init__(
        self,
        weights: CheckpointWeights,
        dims: LlamaDims,
        prefix: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.weights, self.dims, self.prefix = weights, dims, prefix
        self.dtype, self.device = dtype, device

    def take(self, name: str, *shape: int) -> torch.Tensor:
        return self.weights.take(self.prefix + name, shape, self.dtype, self.device)

    def maybe(self, present: bool, name: str, *shape: int) -> torch.Tensor | None:
        return self.take(name, *shape) if present else None

    def layer(self, index: int) -> LlamaLayerWeights:
        d, attn, mlp = self.dims, f"layers.{index}.self_attn.", f"layers.{index}.mlp."
        q_width, kv_width = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        widths = {"q": q_width, "k": kv_width, "v": kv_width}
        qkv = [self.take(f"{attn}{n}_proj.weight", w, d.hidden_size) for n, w in widths.items()]
        qkv_bias = [self.maybe(d.qkv_bias, f"{attn}{n}_proj.bias", w) for n, w in widths.items()]
        inter = d.intermediate_size
        gate_up = [self.take(f"{mlp}{n}_proj.weight", inter, d.hidden_size) for n in GATE_UP]
        gate_up_bias = [self.maybe(d.mlp_bias, f"{mlp}{n}_proj.bias", inter) for n in GATE_UP]
        return LlamaLayerWeights(
            input_norm=self.take(f"layers.{index}.input_layernorm.weight", d.hidden_size),
            qkv_weight=torch.cat(qkv),
            qkv_bias=_cat_optional(qkv_bias),
            qk_norm=self._qk_norm(attn) if d.qk_norm else None,
            o_weight=self.take(f"{attn}o_proj.weight", d.hidden_size, q_width),
            o_bias=self.maybe(d.o_bias, f"{attn}o_proj.bias", d.hidden_size),
            post_norm=self.take(f"layers.{index}.post_attention_layernorm.weight", d.hidden_size),
            gate_up_weight=torch.cat(gate_up),
            gate_up_bias=_cat_optional(gate_up_bias),
            down_weight=self.take(f"{mlp}down_proj.weight", d.hidden_size, d.intermediate_size),
            down_bias=self.maybe(d.mlp_bias, f"{mlp}down_proj.bias", d.hidden_size),
        )

    def _qk_norm(self, attn: str) -> torch.Tensor:
        d = self.dims
        q_norm = self.take(f"{attn}q_norm.weight", d.head_dim).expand(d.num_heads, -1)
        k_norm = self.take(f"{attn}k_norm.weight", d.head_dim).expand(d.num_kv_heads, -1)
        return torch.cat([q_norm, k_norm])  # [H + KV, D]


def _cat_optional(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [part for part in parts if part is not None]
    return torch.cat(present) if present else None


class LlamaForCausalLM(TextOnlyModel):
    """LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM: a text-only paged model."""

    def __init__(self, decoder: LlamaDecoder) -> None:
        self.decoder = decoder
        self.adopt_dims(decoder)


def build_llama(
    config: PretrainedConfig,
    folder: Path,
    dtype: torch.dtype,
    device: torch.device,
    weights: CheckpointWeights | None = None,
) -> LlamaForCausalLM:
    """LlamaForCausalLM, Qwen2ForCausalLM (the same decoder with q/k/v bias) or
    Qwen3ForCausalLM (with QK-norm); `weights` default to the folder's safetensors."""
    model_type = getattr(config, "model_type", "")
    if model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        raise ModelLoadError(folder / "config.json", "sliding-window attention is not supported")
    weights = weights or CheckpointWeights(folder)
    decoder = LlamaDecoder(
        config,
        weights,
        prefix="model.",
        lm_head_name="lm_head.weight",
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        dtype=dtype,
        device=device,
        qkv_bias_always=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
    )
    weights.check_all_used()
    return LlamaForCausalLM(decoder)
