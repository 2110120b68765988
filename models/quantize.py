"""Weight quantisation applied to a loaded decoder: `quantize_decoder(model, "int8")`.

Every matrix of the decoder's layers (q/k/v, o, gate/up, down; GPT-2's c_attn, c_proj,
c_fc) becomes an `Int8Weight` and the layers' product learns to take it
(models/linear.py). Norms, biases, embeddings and the vision tower stay in the model's
dtype. The output layer stays too: its int8 product measured slower than the float one
(BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from models.layers import PagedDecoderModel
from models.linear import Int8Product, Int8Weight

QUANTIZATIONS = ("none", "int8")
logger = logging.getLogger(__name__)


def quantize_decoder(model: PagedDecoderModel, quantization: str) -> None:
    """Quantise `model`'s layer matrices in place; "none" leaves it as loaded."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")
    if quantization == "none":
        return
    product = Int8Product(model.product)
    for layer in model.layers:
        _quantize_matrices(layer.w)
        layer.product = product
    model.product = product
    logger.info("int8 weights in %d decoder layers; the output layer stays", len(model.layers))


def _quantize_matrices(weights: object) -> None:
    """Replace each 2-D tensor field of a layer's weights dataclass (alone or in a tuple)."""
    for field in dataclasses.fields(weights):  # type: ignore[arg-type]
        value = getattr(weights, field.name)
        if isinstance(value, tuple):
            setattr(weights, field.name, tuple(_quantized(item) for item in value))
        else:
            setattr(weights, field.name, _quantized(value))


def _quantized(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        return Int8Weight.quantize(value)
    return value
