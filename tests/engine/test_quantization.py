"""The engine passes its quantization setting to the model loader, and nothing more."""

from __future__ import annotations

from pathlib import Path

from app.engine.async_engine import AsyncEngine
from app.engine.config import EngineConfig
from models.cpu_weights import FbgemmInt8Weight, PreparedProduct


def test_int8_setting_loads_int8_weights(tiny_gpt2_dir: Path) -> None:
    config = EngineConfig(
        model=str(tiny_gpt2_dir), device="cpu", quantization="int8", num_threads=1, warm_up=False
    )
    model = AsyncEngine(config).loaded.model
    assert isinstance(model.product, PreparedProduct)
    assert all(isinstance(layer.w.qkv[0], FbgemmInt8Weight) for layer in model.layers)  # type: ignore[attr-defined]
