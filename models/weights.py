"""Read a checkpoint's tensors by name from safetensors files (single or sharded).

Tensors are read lazily, one at a time, checked against the shape the model
expects and moved straight to the target device and dtype. Every tensor must be
claimed: `check_all_used` names the ones nobody asked for, so a checkpoint that
does not match its config fails loudly instead of serving half-random weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from models.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _shard_map(folder: Path) -> dict[str, Path]:
    """Name in file -> file, for the index's tensors or the single file's."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        return _read_index(index_path)
    single = folder / SINGLE_FILE
    if single.is_file():
        return dict.fromkeys(_header_names(single), single)
    hint = " (pytorch_model.bin is not supported)" if any(folder.glob("*.bin")) else ""
    raise ModelLoadError(folder, f"no {SINGLE_FILE} or {INDEX_FILE} found{hint}")


def _read_index(index_path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(index_path, f"unreadable index ({exc})") from exc
    files = {name: index_path.parent / str(shard) for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
        if not shard.is_file():
            raise ModelLoadError(shard, f"weight shard listed in {INDEX_FILE} is missing")
    return files


def _header_names(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(path, f"unreadable safetensors file ({exc})") from exc


class CheckpointWeights:
    """The tensors of one folder, addressed by canonical name (see `rename`); or tensors
    already in memory (a GGUF file's, dequantised), with `folder` the file they came from."""

    def __init__(
        self,
        folder: Path,
        rename: Callable[[str], str] = str,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.folder = folder
        self._tensors = tensors
        files = dict.fromkeys(tensors, folder) if tensors is not None else _shard_map(folder)
        self._location: dict[str, tuple[Path, str]] = {}
        for stored_name, path in files.items():
            self._location[rename(stored_name)] = (path, stored_name)
        self._handles: dict[Path, Any] = {}
        self._used: set[str] = set()

    def names(self) -> list[str]:
        return list(self._location)

    def has(self, name: str) -> bool:
        return name in self._location

    def take(
        self,
        name: str,
        shape: Iterable[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        """The tensor `name`, checked against `shape`, on `device` in `dtype`."""
        tensor = self._read(name)
        expected = tuple(shape)
        if tuple(tensor.shape) != expected:
            path, stored = self._location[name]
            found = tuple(tensor.shape)
            raise ModelLoadError(path, f"tensor {stored!r} has shape {found}, expected {expected}")
        return tensor.to(device=device, dtype=dtype)

    def take_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix`, keyed by the rest of its name (shapes checked by caller)."""
        names = [name for name in self._location if name.startswith(prefix)]
        return {name[len(prefix) :]: self._read(name) for name in names}

    def skip(self, name: str) -> None:
        """Mark a tensor as deliberately unused (e.g. a stored copy of tied embeddings)."""
        self._used.add(name)

    def check_all_used(self) -> None:
        unused = sorted(set(self._location) - self._used)
        if unused:
            shown = ", ".join(repr(self._location[name][1]) for name in unused[:5])
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise ModelLoadError(
                self.folder, f"{len(unused)} unexpected tensors for this config: {shown}{more}"
            )

    def _read(self, name: str) -> torch.Tensor:
        if name not in self._location:
            raise ModelLoadError(self.folder, f"missing tensor {name!r} in the checkpoint weights")
        path, stored_name = self._location[name]
        self._used.add(name)
        if self._tensors is not None:
            return self._tensors[stored_name]
        try:
            return self._handle(path).get_tensor(stored_name)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(path, f"cannot read tensor {stored_name!r} ({exc})") from exc

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise ModelLoadError(path, f"unreadable safetensors file ({exc})") from exc
        return self._handles[path]
