"""A PEFT LoRA folder read and checked against the modules a base model can adapt.

`adapter_config.json` gives the rank, alpha (and rslora), and the target modules as a list
of names or one regular expression (what `mmgpt finetune` writes); `adapter_model.safetensors`
holds `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].
Everything is checked before anything is written, so a refused adapter leaves no trace.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from models.errors import ModelLoadError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TENSOR_NAME = re.compile(
    r"base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.\w+)?\.weight"
)
# Module names of older transformers -> the names the sites use (transformers 5's).
MODULE_ALIASES = (
    ("language_model.model.", "model.language_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
# Settings of PEFT's LoraConfig that change the product in ways not served here.
UNSUPPORTED_WHEN_SET = (
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
)


class LoraLoadError(ModelLoadError):
    """An adapter folder that cannot be served beside this base model."""


@dataclass(frozen=True)
class LoraSite:
    """One part of one of our weights that a PEFT module name adapts."""

    projection: Any  # models.lora.projection.LoraProjection
    part: int
    width: int  # output rows of this part
    in_features: int


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    scaling: float
    target_modules: list[str] | str


@dataclass(frozen=True)
class SiteWrite:
    site: LoraSite
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [width, r], scaled


def read_config(folder: Path, max_rank: int) -> AdapterConfig:
    raw = _read_json(folder / CONFIG_FILE)
    path = folder / CONFIG_FILE
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraLoadError(path, f"peft_type {raw.get('peft_type')!r} is not LORA")
    for key in UNSUPPORTED_WHEN_SET:
        if raw.get(key):
            raise LoraLoadError(path, f"{key} is not supported")
    if raw.get("bias", "none") != "none":
        raise LoraLoadError(path, "trained biases (bias != 'none') are not supported")
    rank, alpha = int(raw.get("r", 8)), float(raw.get("lora_alpha", 8))
    if not 0 < rank <= max_rank:
        raise LoraLoadError(path, f"rank {rank} exceeds the maximum LoRA rank {max_rank}")
    root = math.sqrt(rank) if raw.get("use_rslora") else rank
    targets = raw.get("target_modules")
    if not targets:
        raise LoraLoadError(path, "target_modules is empty")
    return AdapterConfig(rank, alpha / root, targets)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise LoraLoadError(path, "not found: not a PEFT adapter folder") from exc
    except (OSError, ValueError) as exc:
        raise LoraLoadError(path, f"unreadable ({exc})") from exc
    if not isinstance(loaded, dict):
        raise LoraLoadError(path, "not a JSON object")
    return loaded


def plan_writes(folder: Path, config: AdapterConfig, sites: dict[str, LoraSite]) -> list[SiteWrite]:
    """Every (site, A, scaled B) of the adapter, checked; raises before any write."""
    _check_targets(folder / CONFIG_FILE, config.target_modules, sites)
    pairs = _read_pairs(folder / WEIGHTS_FILE)
    writes = []
    for module, (lora_a, lora_b) in sorted(pairs.items()):
        site = sites.get(module)
        if site is None:
            raise LoraLoadError(
                folder / WEIGHTS_FILE, f"adapts {module}, which this base model cannot adapt"
            )
        _check_shapes(folder / WEIGHTS_FILE, module, site, lora_a, lora_b, config.rank)
        writes.append(SiteWrite(site, lora_a, lora_b * config.scaling))
    return writes


def _check_targets(path: Path, targets: list[str] | str, sites: dict[str, LoraSite]) -> None:
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in sites):
            raise LoraLoadError(path, f"target_modules {targets!r} matches no module of the base")
        return
    missing = [t for t in targets if not any(_names_module(name, t) for name in sites)]
    if missing:
        raise LoraLoadError(path, f"target modules the base model does not have: {missing}")


def _names_module(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _read_pairs(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    try:
        tensors = load_file(str(path))
    except FileNotFoundError as exc:
        raise LoraLoadError(path, "not found: not a PEFT adapter folder") from exc
    except (SafetensorError, OSError) as exc:
        raise LoraLoadError(path, f"unreadable safetensors file ({exc})") from exc
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = TENSOR_NAME.fullmatch(name)
        if match is None:
            raise LoraLoadError(path, f"unexpected tensor {name} (only lora_A/lora_B are served)")
        module = canonical_module(match["module"])
        halves.setdefault(module, {})[match["kind"]] = tensor.float()
    if not halves:
        raise LoraLoadError(path, "holds no LoRA tensors")
    incomplete = [module for module, pair in halves.items() if len(pair) != 2]
    if incomplete:
        raise LoraLoadError(path, f"lora_A or lora_B missing for {incomplete[0]}")
    return {module: (pair["A"], pair["B"]) for module, pair in halves.items()}


def canonical_module(name: str) -> str:
    for old, new in MODULE_ALIASES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _check_shapes(
    path: Path,
    module: str,
    site: LoraSite,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    rank: int,
) -> None:
    expected_a, expected_b = (rank, site.in_features), (site.width, rank)
    if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
        raise LoraLoadError(
            path,
            f"{module}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not fit "
            f"the base (expected {expected_a} and {expected_b})",
        )
