"""Rotary position embeddings, precomputed once per model for every position.

The inverse frequencies come from transformers' own rope helpers, so the
scaling types a checkpoint names ("linear", "llama3", "yarn", ...) mean exactly
what they mean there. Per step the model looks up cos/sin rows by position once
and every layer reuses them.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from models.errors import ModelLoadError

# Types whose frequencies do not depend on the current sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_parameters(config: PretrainedConfig, layer_type: str | None) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:  # Gemma 3: one set of parameters per layer type
        params = dict(params[layer_type])
    if not params:  # transformers < 5 keeps rope_theta / rope_scaling at the top level
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(
    config: PretrainedConfig, head_dim: int, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    """[head_dim // 2] float32 inverse frequencies and the cos/sin scaling factor; the
    parameters of `layer_type` where the config keeps one set per layer type. A GGUF's
    per-frequency factors (`rope_freq_factors`, models/gguf.py) divide the frequencies."""
    inv_freq, scaling = _scaled_frequencies(config, head_dim, layer_type)
    factors = getattr(config, "rope_freq_factors", None)
    if factors is not None:
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
    return inv_freq, scaling


def _scaled_frequencies(
    config: PretrainedConfig, head_dim: int, layer_type: str | None
) -> tuple[torch.Tensor, float]:
    params = _rope_parameters(config, layer_type)
    rope_type = params["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        supported = ", ".join(STATIC_ROPE_TYPES)
        raise ModelLoadError("config.json", f"rope type {rope_type!r} unsupported ({supported})")
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", layer_type=layer_type)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding:
    """cos/sin tables [max_positions, head_dim] with the rotate-half sign folded into sin."""

    def __init__(
        self,
        config: PretrainedConfig,
        head_dim: int,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
        layer_type: str | None = None,
    ) -> None:
        inv_freq, scaling = inverse_frequencies(config, head_dim, layer_type)
        positions = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
        half_sin = freqs.sin() * scaling
        self.cos = (torch.cat((freqs, freqs), dim=-1).cos() * scaling).to(device, dtype)  # [P, D]
        # rotate_half(x) * sin == roll(x, D/2) * signed_sin: one roll instead of slice+neg+cat
        self.signed_sin = torch.cat((-half_sin, half_sin), dim=-1).to(device, dtype)  # [P, D]
        self.half = head_dim // 2

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] -> cos, signed_sin each [T, 1, D], ready to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] rotated by its positions."""
        return torch.addcmul(x * cos, x.roll(self.half, dims=-1), signed_sin)
