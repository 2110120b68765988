"""The adapter registry of one loaded model: fixed slots, loading, and the rows of a step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.base import BASE_ADAPTER_SLOT, LoadedAdapter
from models.lora.adapter import LoraLoadError, plan_writes, read_config
from models.lora.projection import LoraProduct, LoraProjection, LoraStep
from models.lora.sites import PROJECTOR_MODULES, decoder_sites, projector_sites

# Up to this many rows, a step of several adapters applies every slot to every row under a
# mask (a fixed number of ops); beyond it, each adapter's rows are gathered (less compute).
STACKED_MAX_ROWS = 64


class LoraSlots:
    """Up to `max_loras` adapters of rank up to `max_rank`, held in the layers' products."""

    def __init__(self, model: Any, max_loras: int, max_rank: int) -> None:
        self.max_loras, self.max_rank = max_loras, max_rank
        self.device, self.dtype = model.device, model.dtype
        self.step = LoraStep()
        self.projections: list[LoraProjection] = []
        self.sites, by_weight = decoder_sites(model, self._new_projection)
        image_sites, image_by_weight = projector_sites(model, self._new_projection)
        self.sites.update(image_sites)
        for layer in model.layers:
            layer.product = LoraProduct(layer.product, by_weight, self.step)
        if image_by_weight:
            model.projector_product = LoraProduct(
                model.projector_product, image_by_weight, self.step
            )
        self._free = list(range(max_loras))

    def _new_projection(self, in_features: int, widths: list[int]) -> LoraProjection:
        projection = LoraProjection(
            in_features, widths, self.max_loras, self.max_rank, self.dtype, self.device
        )
        self.projections.append(projection)
        return projection

    @property
    def num_free(self) -> int:
        return len(self._free)

    def load(self, folder: str | Path) -> LoadedAdapter:
        """Read, check and write one PEFT folder into a free slot; all or nothing."""
        folder = Path(folder)
        config = read_config(folder, self.max_rank)
        writes = plan_writes(folder, config, self.sites)
        if not self._free:
            raise LoraLoadError(folder, f"all {self.max_loras} adapter slots are in use")
        slot = self._free.pop(0)
        for write in writes:
            write.site.projection.write(slot, write.site.part, write.lora_a, write.lora_b)
        adapted = {id(write.site.projection) for write in writes}
        adapts_images = any(id(self.sites[name].projection) in adapted for name in self._images)
        return LoadedAdapter(slot, config.rank, adapts_images)

    @property
    def _images(self) -> list[str]:
        return [name for name in PROJECTOR_MODULES if name in self.sites]

    def unload(self, slot: int) -> None:
        for projection in self.projections:
            projection.clear(slot)
        self._free.append(slot)

    def select(self, row_slots: Sequence[tuple[int, int]]) -> None:
        """The next call's rows: per run of the flat batch (slot, number of rows), in order."""
        rows_of: dict[int, list[int]] = {}
        num_rows = 0
        for slot, count in row_slots:
            if slot != BASE_ADAPTER_SLOT:
                rows_of.setdefault(slot, []).extend(range(num_rows, num_rows + count))
            num_rows += count
        if len(rows_of) == 1 and len(next(iter(rows_of.values()))) == num_rows:
            self.step.set_groups([(next(iter(rows_of)), None)])
        elif len(rows_of) > 1 and num_rows <= STACKED_MAX_ROWS:
            per_row = [slot for slot, count in row_slots for _ in range(count)]
            row_tensor = torch.tensor(per_row, dtype=torch.int64, device=self.device)
            self.step.set_groups([(slot, None) for slot in rows_of], row_tensor)
        else:
            self.step.set_groups([
                (slot, torch.tensor(rows, dtype=torch.int64, device=self.device))
                for slot, rows in rows_of.items()
            ])  # fmt: skip

    def select_all(self, slot: int) -> None:
        """Every row of the next call belongs to `slot` (BASE_ADAPTER_SLOT: to no adapter)."""
        self.step.set_groups([] if slot == BASE_ADAPTER_SLOT else [(slot, None)])


def enable_lora(model: Any, max_loras: int, max_rank: int) -> LoraSlots:
    """Give `model` an adapter registry (`model.lora`); call after any quantisation."""
    if getattr(model, "lora", None) is not None:
        raise ValueError("this model already has LoRA adapter slots")
    slots = LoraSlots(model, max_loras, max_rank)
    model.lora = slots
    return slots
