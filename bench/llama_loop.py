"""A bare static-batch Llama decode loop: bench.gpt2_loop's speed limit for Llama checkpoints.

The same rules as the GPT-2 loop: one contiguous pre-allocated KV cache per layer, every
row of the batch the same prompt length, a hand-written forward over the checkpoint's own
weights (q/k/v and gate/up fused, as models/llama.py does), logits of the last position
only, greedy. Products and argmax are the engine's fastest CPU forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig

from bench import bare_loop
from models.layers import product_for, rms_norm
from models.linear import Product, logits
from models.rope import RotaryEmbedding


@dataclass
class LlamaLayer:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2 * KV) * D, hidden]
    attn_out: torch.Tensor  # [hidden, H * D]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


@dataclass
class LlamaWeights:
    token_embedding: torch.Tensor  # [vocab, hidden]
    layers: list[LlamaLayer]
    norm: torch.Tensor
    lm_head: torch.Tensor  # [vocab, hidden], perhaps the embedding itself
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    rope: RotaryEmbedding
    product: Product  # the engine's choice of matrix product for this model

    @property
    def hidden_size(self) -> int:
        return int(self.token_embedding.shape[1])


def load_llama(folder: str | Path, dtype: torch.dtype = torch.float32) -> LlamaWeights:
    """Reads a Hugging Face Llama folder without biases (Llama, SmolLM2)."""
    config = AutoConfig.from_pretrained(folder)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors |= {k.removeprefix("model."): v.to(dtype) for k, v in load_file(str(path)).items()}
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = [_layer(tensors, f"layers.{i}.") for i in range(config.num_hidden_layers)]
    embedding = tensors["embed_tokens.weight"].contiguous()
    lm_head = tensors.get("lm_head.weight", embedding)
    return LlamaWeights(
        token_embedding=embedding,
        layers=layers,
        norm=tensors["norm.weight"],
        lm_head=lm_head,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        eps=config.rms_norm_eps,
        rope=RotaryEmbedding(
            config, head_dim, config.max_position_embeddings, dtype, torch.device("cpu")
        ),
        product=product_for(layers, lm_head),
    )


def _layer(tensors: dict[str, torch.Tensor], prefix: str) -> LlamaLayer:
    def weight(name: str) -> torch.Tensor:
        return tensors[f"{prefix}{name}.weight"]

    attn, mlp = "self_attn.", "mlp."
    return LlamaLayer(
        input_norm=weight("input_layernorm"),
        qkv=torch.cat([weight(f"{attn}{n}_proj") for n in "qkv"]),
        attn_out=weight(f"{attn}o_proj"),
        post_norm=weight("post_attention_layernorm"),
        gate_up=torch.cat([weight(f"{mlp}gate_proj"), weight(f"{mlp}up_proj")]),
        down=weight(f"{mlp}down_proj"),
    )


class StaticKVCache(bare_loop.StaticKVCache):
    def __init__(self, weights: LlamaWeights, batch_size: int, max_len: int) -> None:
        kv_heads, head_dim, dtype = (
            weights.num_kv_heads,
            weights.head_dim,
            weights.token_embedding.dtype,
        )
        super().__init__(len(weights.layers), batch_size, kv_heads, max_len, head_dim, dtype)


def _attention(
    weights: LlamaWeights,
    layer: LlamaLayer,
    x: torch.Tensor,  # [B*T, hidden]
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    cache: StaticKVCache,
    index: int,
    start: int,
) -> torch.Tensor:  # [B*T, hidden]
    """Causal GQA self-attention of the new tokens over cache + themselves."""
    batch, steps = cache.keys.shape[1], x.shape[0] // cache.keys.shape[1]
    heads, kv_heads, head_dim = weights.num_heads, weights.num_kv_heads, weights.head_dim
    qkv = weights.product(x, layer.qkv, None).view(batch * steps, -1, head_dim)
    q_and_k = weights.rope.apply(qkv[:, : heads + kv_heads], *cos_sin)  # [B*T, H + KV, D]
    query = q_and_k[:, :heads].view(batch, steps, heads, head_dim).transpose(1, 2)
    key = q_and_k[:, heads:].view(batch, steps, kv_heads, head_dim).transpose(1, 2)
    value = qkv[:, heads + kv_heads :].view(batch, steps, kv_heads, head_dim).transpose(1, 2)
    out = cache.attend(index, start, query, key, value)  # [B, H, T, D]
    out = out.transpose(1, 2).reshape(batch * steps, heads * head_dim)
    return weights.product(out, layer.attn_out, None)


def forward(
    weights: LlamaWeights, cache: StaticKVCache, input_ids: torch.Tensor, start: int
) -> torch.Tensor:
    """input_ids [B, T] at positions start..start+T-1 -> logits of the last position [B, vocab]."""
    batch, steps = input_ids.shape
    if steps > 1 and start != 0:
        raise ValueError("multi-token forwards are prefills and must start at position 0")
    hidden = weights.token_embedding[input_ids.reshape(-1)]  # [B*T, hidden]
    positions = torch.arange(start, start + steps).repeat(batch)  # [B*T]
    cos_sin = weights.rope.lookup(positions)
    for index, layer in enumerate(weights.layers):
        normed = rms_norm(hidden, layer.input_norm, weights.eps)
        hidden = hidden + _attention(weights, layer, normed, cos_sin, cache, index, start)
        normed = rms_norm(hidden, layer.post_norm, weights.eps)
        gate, up = weights.product(normed, layer.gate_up, None).chunk(2, dim=-1)
        hidden = hidden + weights.product(F.silu(gate) * up, layer.down, None)
    last = hidden.view(batch, steps, -1)[:, -1]  # [B, hidden]
    last = rms_norm(last, weights.norm, weights.eps)
    return logits(last, weights.lm_head, weights.product)  # [B, vocab], perhaps transposed


def greedy_decode(
    weights: LlamaWeights,
    prompt_ids: torch.Tensor,
    new_tokens: int,
    cache: StaticKVCache | None = None,
) -> torch.Tensor:
    """prompt_ids [B, P] -> the next `new_tokens` greedy tokens of every row [B, new_tokens]."""
    batch, prompt_len = prompt_ids.shape
    cache = cache or StaticKVCache(weights, batch, prompt_len + new_tokens)
    return bare_loop.greedy_decode(
        lambda input_ids, start: forward(weights, cache, input_ids, start), prompt_ids, new_tokens
    )
