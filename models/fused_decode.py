"""A one-stream decode step in one C++ call (models/cpu_kernels): Llama-family decoders
and GPT-2, on the CPU with float32 activations.

A single sequence's decode step of a deep, narrow model is mostly Python dispatch around
four matrix products a layer; the kernels run every layer in one call and compute the torch
path's numbers (models/README.md says how). They take a step that is one decode and nothing
else, of a model whose matrices are float32 (plain, or packed with their plain copy) or
FBGEMM int8, whose activation they know, and which serves no adapters; every other step
takes the torch path.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from models import cpu_kernels
from models.attention import KVCache
from models.attention_inputs import AttentionInputs
from models.cpu_weights import FbgemmInt8Weight, PackedWeight, PreparedProduct
from models.layers import field_values, tanh_gelu
from models.linear import OrientedLinear, Product

# Attention runs on torch's threads from this many multiply-adds of its query-key product
# (every head of the sequence) up; below it a parallel region costs more than it saves.
PARALLEL_ATTENTION_WORK = 1 << 18
MATRICES_PER_LAYER = 4  # every kernel's layer: q/k/v, attention output, MLP in, MLP out
# The activations the GPT-2 kernel computes, and whether each is the tanh approximation.
GPT2_ACTIVATIONS: dict[Callable[..., Any], bool] = {tanh_gelu: True, F.gelu: False}


class FusableLayer(Protocol):
    """What a kernel reads of a decoder layer (LlamaLayer, GPT2Layer)."""

    @property
    def product(self) -> Product: ...

    @property
    def act(self) -> Callable[..., Any]: ...

    @property
    def scale(self) -> float: ...

    @property
    def w(self) -> object: ...


class FusedStep(Protocol):
    def run(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None,
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
    ) -> torch.Tensor: ...


def _one_stream_decode(hidden: torch.Tensor, attn_inputs: AttentionInputs) -> bool:
    """The step is a single sequence's decode, attended from its cache blocks."""
    if hidden.shape[0] != 1 or attn_inputs.prefills or len(attn_inputs.decode_groups) != 1:
        return False
    group = attn_inputs.decode_groups[0]
    return group.mirror is None and group.block_ids is not None


def _cache_arguments(attn_inputs: AttentionInputs, kv_cache: list[KVCache]) -> tuple[Any, ...]:
    """k_caches, v_caches, slot_mapping, block_ids and seq_lens, as the kernels take them."""
    (group,) = attn_inputs.decode_groups
    return (
        [k for k, _ in kv_cache],
        [v for _, v in kv_cache],
        attn_inputs.slot_mapping,
        group.block_ids,
        [attn_inputs.context_lens[0] + 1],
    )


@dataclasses.dataclass(frozen=True)
class KernelWeights:
    """Every layer's weights as the kernels take them (torch.classes.mmgpt.DecodeWeights)."""

    # per layer, in its weights dataclass's field order (pairs flattened): float32 tensors,
    # None for a weight the layer lacks and for an int8 matrix
    tensors: list[torch.Tensor | None]
    int8: list[object]  # FBGEMM's packed int8 matrices, MATRICES_PER_LAYER a layer; or none
    reduce_range: bool  # how FBGEMM rounds the activations (models/cpu_weights.py)
    weight_major: bool  # float32 products take one row as weight @ row (OrientedLinear)
    # the same matrices as Int8Rows' tensors, three a matrix, where every one has them:
    # the kernel then multiplies them itself (VNNI) instead of calling FBGEMM
    int8_rows: list[torch.Tensor] = dataclasses.field(default_factory=list)
    activation_scale: float = 1.0  # the rows' activation rounding
    zero_point: int = 0

    @functools.cached_property
    def script_object(self) -> object:
        """The weights in one object, made once: a step passes it instead of the lists,
        whose hundreds of items each cost a conversion per call."""
        return torch.classes.mmgpt.DecodeWeights(
            self.tensors,
            self.int8,
            self.reduce_range,
            self.int8_rows,
            self.activation_scale,
            self.zero_point,
            self.weight_major,
        )


@dataclasses.dataclass(frozen=True)
class FusedLlamaDecode:
    """torch.ops.mmgpt.llama_decode's arguments that stay fixed from step to step."""

    weights: KernelWeights
    num_heads: int
    eps: float
    scale: float

    def run(
        self,
        hidden: torch.Tensor,  # [1, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None,  # each [1, 1, D]
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
    ) -> torch.Tensor:  # [1, hidden], before the final norm
        assert cos_sin is not None
        cos, signed_sin = (table.reshape(1, -1) for table in cos_sin)
        return torch.ops.mmgpt.llama_decode(
            hidden,
            cos,
            signed_sin,
            self.weights.script_object,
            *_cache_arguments(attn_inputs, kv_cache),
            self.num_heads,
            self.eps,
            self.scale,
            PARALLEL_ATTENTION_WORK,
        )


@dataclasses.dataclass(frozen=True)
class FusedGPT2Decode:
    """torch.ops.mmgpt.gpt2_decode's arguments that stay fixed from step to step."""

    weights: KernelWeights
    scales: list[float]  # per layer
    num_heads: int
    eps: float
    tanh_gelu: bool

    def run(
        self,
        hidden: torch.Tensor,  # [1, hidden], positions already added
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None,
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
    ) -> torch.Tensor:  # [1, hidden], before the final norm
        return torch.ops.mmgpt.gpt2_decode(
            hidden,
            self.weights.script_object,
            self.scales,
            *_cache_arguments(attn_inputs, kv_cache),
            self.num_heads,
            self.eps,
            self.tanh_gelu,
            PARALLEL_ATTENTION_WORK,
        )


class FusedDecodeCache:
    """A decoder's fused step, built on first use and again whenever its layers' products
    change: quantisation and adapters replace them after the model is built."""

    def __init__(
        self,
        layers: Sequence[FusableLayer],
        build: Callable[[Sequence[FusableLayer]], FusedStep | None],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers, self.build = layers, build
        self.enabled = device.type == "cpu" and dtype == torch.float32  # False: the torch path
        self._products: list[Product] = []
        self._fused: FusedStep | None = None
        if self.enabled:
            cpu_kernels.available()  # built now, while loading, not in the first request

    def for_step(self, hidden: torch.Tensor, attn_inputs: AttentionInputs) -> FusedStep | None:
        """The fused step where this step is one for it, else None (the torch path)."""
        return self.get() if _one_stream_decode(hidden, attn_inputs) else None

    def get(self) -> FusedStep | None:
        if not self.enabled:
            return None
        products = [layer.product for layer in self.layers]
        if len(products) != len(self._products) or any(
            a is not b for a, b in zip(products, self._products, strict=True)
        ):
            self._products = products
            self._fused = self._build()
        return self._fused

    def _build(self) -> FusedStep | None:
        products = (_float_product(layer.product) for layer in self.layers)
        if not self.layers or any(product is None for product in products):
            return None  # an adapter's product, or one the kernels do not know
        if not cpu_kernels.available():
            return None
        try:
            return self.build(self.layers)
        except _NotFusable:
            return None


def build_llama_decode(
    layers: Sequence[FusableLayer], num_heads: int, eps: float
) -> FusedLlamaDecode:
    if any(layer.act is not F.silu for layer in layers):
        raise _NotFusable
    return FusedLlamaDecode(
        weights=_kernel_weights(layers),
        num_heads=num_heads,
        eps=eps,
        scale=layers[0].scale,
    )


def build_gpt2_decode(
    layers: Sequence[FusableLayer], num_heads: int, eps: float
) -> FusedGPT2Decode:
    act = layers[0].act
    if act not in GPT2_ACTIVATIONS or any(layer.act is not act for layer in layers):
        raise _NotFusable
    return FusedGPT2Decode(
        weights=_kernel_weights(layers),
        scales=[layer.scale for layer in layers],
        num_heads=num_heads,
        eps=eps,
        tanh_gelu=GPT2_ACTIVATIONS[act],
    )


class _NotFusable(Exception):
    """A layer the kernel cannot run: another activation, or a weight it cannot read
    (bfloat16, the portable int8 form, packed without its plain copy)."""


def _float_product(product: Product) -> Product | None:
    """The float product a layer's one-row products take; None for any other (LoRA's)."""
    if isinstance(product, PreparedProduct):
        product = product.float_product
    return product if product is F.linear or isinstance(product, OrientedLinear) else None


def _one_row_weight_major(product: Product) -> bool:
    float_product = _float_product(product)
    return isinstance(float_product, OrientedLinear) and float_product.by_rows[1]


def _kernel_weights(layers: Sequence[FusableLayer]) -> KernelWeights:
    tensors: list[torch.Tensor | None] = []
    int8: list[FbgemmInt8Weight] = []
    for layer in layers:
        for value in field_values(layer.w):
            if isinstance(value, FbgemmInt8Weight):
                tensors.append(None)
                int8.append(value)
            else:
                tensors.append(_plain(value))
    if int8 and len(int8) != MATRICES_PER_LAYER * len(layers):
        raise _NotFusable  # some matrices int8, others not
    weights = KernelWeights(
        tensors=tensors,
        int8=[weight.packed for weight in int8],
        reduce_range=bool(int8) and int8[0].reduce_range,
        weight_major=_one_row_weight_major(layers[0].product),
    )
    rows = [weight.rows for weight in int8]
    if not int8 or any(matrix is None for matrix in rows):
        return weights
    first = rows[0]
    assert first is not None
    return dataclasses.replace(
        weights,
        int8_rows=[tensor for matrix in rows if matrix for tensor in matrix.arguments()],
        activation_scale=first.activation_scale,
        zero_point=first.zero_point,
    )


def _plain(value: object) -> torch.Tensor | None:
    """A weight as the kernel reads it: a contiguous float32 tensor, None where the layer
    has none."""
    if isinstance(value, PackedWeight):
        if value.plain is None:
            raise _NotFusable
        value = value.plain
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.contiguous()
    raise _NotFusable
