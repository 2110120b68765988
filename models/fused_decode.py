"""A one-stream decode step of a Llama-family decoder in one C++ call (models/cpu_kernels).

A single sequence's decode step of a deep, narrow model is mostly Python dispatch: about
fifty small ops a layer around four matrix products. On the CPU in float32 the kernel
runs all layers in one call instead: the same products through ATen, in the orientation
the model's own product chose for one row, and plain loops for the rest. It applies where
the torch path would compute exactly these numbers: plain float32 matrices (or packed
ones that keep their plain copy for one row), silu, no adapters, one decode and nothing
else in the step. Everything else takes the torch path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from models import cpu_kernels
from models.attention import KVCache
from models.attention_inputs import AttentionInputs
from models.cpu_weights import PackedWeight, PreparedProduct
from models.linear import OrientedLinear, Product

# Attention runs on torch's threads from this many multiply-adds of its query-key product
# (every head of the sequence) up; below it a parallel region costs more than it saves.
PARALLEL_ATTENTION_WORK = 1 << 18


class FusableLayer(Protocol):
    """What the kernel reads of a LlamaLayer."""

    @property
    def product(self) -> Product: ...

    @property
    def act(self) -> object: ...

    @property
    def scale(self) -> float: ...

    @property
    def w(self) -> object: ...


@dataclasses.dataclass(frozen=True)
class FusedDecode:
    """The kernel's arguments that stay fixed from step to step."""

    weights: list[torch.Tensor | None]  # per layer, in LlamaLayerWeights' field order
    num_heads: int
    eps: float
    scale: float
    weight_major: bool

    def run(
        self,
        hidden: torch.Tensor,  # [1, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # each [1, 1, D]
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
    ) -> torch.Tensor:  # [1, hidden], before the final norm
        (group,) = attn_inputs.decode_groups
        cos, signed_sin = (table.reshape(1, -1) for table in cos_sin)
        return torch.ops.mmgpt.llama_decode(
            hidden,
            cos,
            signed_sin,
            self.weights,
            [k for k, _ in kv_cache],
            [v for _, v in kv_cache],
            attn_inputs.slot_mapping,
            group.block_ids,
            [attn_inputs.context_lens[0] + 1],
            self.num_heads,
            self.eps,
            self.scale,
            self.weight_major,
            PARALLEL_ATTENTION_WORK,
        )


def one_stream_decode(hidden: torch.Tensor, attn_inputs: AttentionInputs) -> bool:
    """The step is a single sequence's decode, attended from its cache blocks."""
    if hidden.shape[0] != 1 or attn_inputs.prefills or len(attn_inputs.decode_groups) != 1:
        return False
    group = attn_inputs.decode_groups[0]
    return group.mirror is None and group.block_ids is not None


class FusedDecodeCache:
    """A decoder's FusedDecode, built on first use and again whenever its layers' products
    change: quantisation and adapters replace them after the model is built."""

    def __init__(
        self,
        layers: Sequence[FusableLayer],
        num_heads: int,
        eps: float,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers, self.num_heads, self.eps, self.device = layers, num_heads, eps, device
        self.enabled = True  # False keeps the torch path (tests compare the two)
        self._products: list[Product] = []
        self._fused: FusedDecode | None = None
        if device.type == "cpu" and dtype == torch.float32:
            cpu_kernels.available()  # built now, while loading, not in the first request

    def get(self) -> FusedDecode | None:
        if not self.enabled:
            return None
        products = [layer.product for layer in self.layers]
        if len(products) != len(self._products) or any(
            a is not b for a, b in zip(products, self._products, strict=True)
        ):
            self._products = products
            self._fused = build_fused_decode(self.layers, self.num_heads, self.eps, self.device)
        return self._fused


def build_fused_decode(
    layers: Sequence[FusableLayer], num_heads: int, eps: float, device: torch.device
) -> FusedDecode | None:
    """The kernel's fixed arguments for these layers, or None where it does not apply."""
    if device.type != "cpu" or not layers:
        return None
    float_product = _float_product(layers[0].product)
    if float_product is None or any(layer.act is not F.silu for layer in layers):
        return None
    try:
        weights = [_plain(getattr(layer.w, f.name)) for layer in layers for f in _fields(layer)]
    except _NoPlainForm:
        return None
    if not cpu_kernels.available():
        return None
    return FusedDecode(
        weights=weights,
        num_heads=num_heads,
        eps=eps,
        scale=layers[0].scale,
        weight_major=isinstance(float_product, OrientedLinear) and float_product.by_rows[1],
    )


def _fields(layer: FusableLayer) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(layer.w)  # type: ignore[arg-type]


def _float_product(product: Product) -> Product | None:
    """The float product a layer's one-row products take; None for any other (LoRA's)."""
    if isinstance(product, PreparedProduct):
        product = product.float_product
    return product if product is F.linear or isinstance(product, OrientedLinear) else None


class _NoPlainForm(Exception):
    """A weight the kernel cannot read (int8, bfloat16, packed without its plain copy)."""


def _plain(value: object) -> torch.Tensor | None:
    """A weight as the kernel reads it: a contiguous float32 tensor, None where the layer
    has none."""
    if isinstance(value, PackedWeight):
        if value.plain is None:
            raise _NoPlainForm
        value = value.plain
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.contiguous()
    raise _NoPlainForm
