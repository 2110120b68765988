"""The decoder's matrices in the form they are served in: `prepare_decoder(model, quantization)`.

- "int8": each matrix of the decoder's layers as int8, one scale per output row. On a CPU
  with FBGEMM, `FbgemmInt8Weight` (the output layer too; its int8 rows kept for one-row
  products where the CPU has VNNI); elsewhere `Int8Weight`, widened at each product.
- "none": on the CPU, matrices that stream from memory in oneDNN's packed layout
  (`PackedWeight`), float32 ones with their plain form kept for one-row products; elsewhere
  as loaded.

Norms, biases, embeddings and the vision tower stay in the model's dtype.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from functools import partial

import torch

from models.cpu_weights import FbgemmInt8Weight, PackedWeight, PreparedProduct
from models.layers import PagedDecoderModel
from models.linear import STREAMED_WEIGHT_BYTES, Int8Weight, PreparedWeight

QUANTIZATIONS = ("none", "int8")
PACKED_DTYPES = (torch.float32, torch.bfloat16)
# Up to this many bytes of layer matrices a packed float32 model keeps its plain weights
# too, and an FBGEMM int8 one its int8 rows, for one-row products (models/cpu_weights.py):
# twice the memory for faster single streams; a bigger model keeps only the packed ones.
KEEP_PLAIN_MAX_BYTES = 2 << 30
logger = logging.getLogger(__name__)

Preparer = Callable[[torch.Tensor], PreparedWeight]


def prepare_decoder(model: PagedDecoderModel, quantization: str) -> None:
    """Put `model`'s layer matrices (and maybe its output layer) in their served form."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")
    on_cpu = model.device.type == "cpu"
    if quantization == "int8":
        fbgemm = on_cpu and FbgemmInt8Weight.available()
        int8_bytes = _layer_bytes(model) // model.dtype.itemsize
        fbgemm_int8 = partial(FbgemmInt8Weight, one_row=int8_bytes <= KEEP_PLAIN_MAX_BYTES)
        _prepare_layers(model, fbgemm_int8 if fbgemm else Int8Weight.quantize)
        if fbgemm:
            _prepare_output_layer(model, fbgemm_int8)
        logger.info(
            "int8 weights (%s) in %d decoder layers; the output layer %s",
            "FBGEMM" if fbgemm else "widened at each product",
            len(model.layers),
            "too" if fbgemm else "stays",
        )
    elif on_cpu and model.dtype in PACKED_DTYPES and _streams_from_memory(model):
        # float32 keeps its plain weights for one-row products (MKL's weight-major GEMV
        # is faster there); bfloat16 runs every row count packed
        keep_plain = model.dtype == torch.float32 and _layer_bytes(model) <= KEEP_PLAIN_MAX_BYTES
        pack = partial(PackedWeight, one_row=model.product if keep_plain else None)
        _prepare_layers(model, pack)
        _prepare_output_layer(model, pack)
        logger.info(
            "%s weights in oneDNN's packed layout%s",
            model.dtype,
            ", the plain ones kept for one-row products" if keep_plain else "",
        )


def _prepare_layers(model: PagedDecoderModel, prepare: Preparer) -> None:
    product = PreparedProduct(model.product)
    for layer in model.layers:
        _replace_matrices(layer.w, prepare)
        layer.product = product
    model.product = product


def _prepare_output_layer(model: PagedDecoderModel, prepare: Preparer) -> None:
    """A tied output layer gets a copy: the embedding lookup keeps reading the float one."""
    if isinstance(model.lm_head, torch.Tensor):
        model.lm_head = prepare(model.lm_head)


def _replace_matrices(weights: object, prepare: Preparer) -> None:
    """Replace each product matrix of a layer's weights dataclass (alone or in a tuple)."""
    for name in _matrix_fields(weights):
        value = getattr(weights, name)
        if isinstance(value, tuple):
            setattr(weights, name, tuple(_prepared(item, prepare) for item in value))
        else:
            setattr(weights, name, _prepared(value, prepare))


def _matrix_fields(weights: object) -> list[str]:
    """The fields that hold a product's weight: a norm's may be 2-D too (Qwen3's per-head
    q/k norms, [heads, head_dim]), but it scales, it does not multiply."""
    names = [field.name for field in dataclasses.fields(weights)]  # type: ignore[arg-type]
    return [name for name in names if not name.endswith("norm")]


def _prepared(value: object, prepare: Preparer) -> object:
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        return prepare(value)
    return value


def _streams_from_memory(model: PagedDecoderModel) -> bool:
    return PackedWeight.available() and _layer_bytes(model) >= STREAMED_WEIGHT_BYTES


def _layer_bytes(model: PagedDecoderModel) -> int:
    total = 0
    for layer in model.layers:
        for name in _matrix_fields(layer.w):
            value = getattr(layer.w, name)
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, torch.Tensor) and item.dim() == 2:
                    total += item.numel() * item.element_size()
    return total
