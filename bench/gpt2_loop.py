"""A bare static-batch GPT-2 decode loop: the speed limit the serving stack is measured against.

No server, no scheduler, no paging: every row of the batch has the same prompt
length, the KV cache is one pre-allocated contiguous tensor per layer, and each
step runs a hand-written forward over the checkpoint's own weights. Only the
last position's logits are computed, and sampling is greedy. The products and
the argmax are the engine's fastest CPU forms (each product in the orientation
measured faster for this model on this machine, the engine's argmax: see
models/linear.py and app/engine/sampling/kernels.py), so that the loop stays a limit rather
than a baseline the engine could pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bench import bare_loop
from models.layers import product_for
from models.linear import Product, logits


@dataclass
class Gpt2Layer:
    ln_1: tuple[torch.Tensor, torch.Tensor]  # weight, bias [hidden]
    qkv: tuple[torch.Tensor, torch.Tensor]  # [3 * hidden, hidden], [3 * hidden]
    attn_out: tuple[torch.Tensor, torch.Tensor]  # [hidden, hidden], [hidden]
    ln_2: tuple[torch.Tensor, torch.Tensor]
    mlp_in: tuple[torch.Tensor, torch.Tensor]  # [4 * hidden, hidden], [4 * hidden]
    mlp_out: tuple[torch.Tensor, torch.Tensor]  # [hidden, 4 * hidden], [hidden]


@dataclass
class Gpt2Weights:
    token_embedding: torch.Tensor  # [vocab, hidden], also the output layer (tied)
    position_embedding: torch.Tensor  # [max_positions, hidden]
    layers: list[Gpt2Layer]
    ln_f: tuple[torch.Tensor, torch.Tensor]
    num_heads: int
    eps: float
    product: Product  # the engine's choice of matrix product for this model

    @property
    def hidden_size(self) -> int:
        return int(self.token_embedding.shape[1])

    @property
    def max_positions(self) -> int:
        return int(self.position_embedding.shape[0])


def load_gpt2(folder: str | Path, dtype: torch.dtype = torch.float32) -> Gpt2Weights:
    """Reads a Hugging Face GPT-2 folder (Conv1D weights, stored [in, out], are kept [out, in])."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}

    def pair(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = tensors[f"{prefix}.weight"], tensors[f"{prefix}.bias"]
        return weight.to(dtype), bias.to(dtype)

    def conv1d(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = pair(prefix)
        return weight.t().contiguous(), bias

    layers = [
        Gpt2Layer(
            ln_1=pair(f"h.{i}.ln_1"),
            qkv=conv1d(f"h.{i}.attn.c_attn"),
            attn_out=conv1d(f"h.{i}.attn.c_proj"),
            ln_2=pair(f"h.{i}.ln_2"),
            mlp_in=conv1d(f"h.{i}.mlp.c_fc"),
            mlp_out=conv1d(f"h.{i}.mlp.c_proj"),
        )
        for i in range(config["n_layer"])
    ]
    token_embedding = tensors["wte.weight"].to(dtype).contiguous()
    return Gpt2Weights(
        token_embedding=token_embedding,
        position_embedding=tensors["wpe.weight"].to(dtype),
        layers=layers,
        ln_f=pair("ln_f"),
        num_heads=config["n_head"],
        eps=config.get("layer_norm_epsilon", 1e-5),
        product=product_for(layers, token_embedding),
    )


class StaticKVCache(bare_loop.StaticKVCache):
    def __init__(self, weights: Gpt2Weights, batch_size: int, max_len: int) -> None:
        heads = weights.num_heads
        head_dim, dtype = weights.hidden_size // heads, weights.token_embedding.dtype
        super().__init__(len(weights.layers), batch_size, heads, max_len, head_dim, dtype)


def _layer_norm(
    x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor], eps: float
) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], params[0], params[1], eps)


def _attention(
    weights: Gpt2Weights,
    layer: Gpt2Layer,
    x: torch.Tensor,
    cache: StaticKVCache,
    index: int,
    start: int,
) -> torch.Tensor:
    """Causal self-attention of the new tokens x [B, T, hidden] over cache + themselves."""
    batch, steps, hidden = x.shape
    heads, product = weights.num_heads, weights.product
    qkv = product(x.reshape(batch * steps, hidden), *layer.qkv)  # [B*T, 3*hidden]
    qkv = qkv.view(batch, steps, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)
    query, key, value = qkv[0], qkv[1], qkv[2]  # [B, heads, T, head_dim]
    out = cache.attend(index, start, query, key, value)
    out = out.transpose(1, 2).reshape(batch * steps, hidden)  # [B*T, hidden]
    return product(out, *layer.attn_out).view(batch, steps, hidden)


def forward(
    weights: Gpt2Weights, cache: StaticKVCache, input_ids: torch.Tensor, start: int
) -> torch.Tensor:
    """input_ids [B, T] at positions start..start+T-1 -> logits of the last position [B, vocab]."""
    batch, steps = input_ids.shape
    if steps > 1 and start != 0:
        raise ValueError("multi-token forwards are prefills and must start at position 0")
    hidden = weights.token_embedding[input_ids] + weights.position_embedding[start : start + steps]
    for index, layer in enumerate(weights.layers):
        normed = _layer_norm(hidden, layer.ln_1, weights.eps)
        hidden = hidden + _attention(weights, layer, normed, cache, index, start)
        normed = _layer_norm(hidden, layer.ln_2, weights.eps).reshape(batch * steps, -1)
        inner = F.gelu(weights.product(normed, *layer.mlp_in), approximate="tanh")  # [B*T, 4h]
        hidden = hidden + weights.product(inner, *layer.mlp_out).view(batch, steps, -1)
    last = _layer_norm(hidden[:, -1], weights.ln_f, weights.eps)  # [B, hidden]
    return logits(
        last, weights.token_embedding, weights.product
    )  # [B, vocab], perhaps a transposed view


def greedy_decode(
    weights: Gpt2Weights,
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
