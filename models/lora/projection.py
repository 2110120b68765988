"""The per-row LoRA delta: stacked A/B matrices per slot and the product that applies them.

A fused weight (q/k/v, gate/up) is one projection of several parts. Each slot holds, per
part, A [rank, in] and B [width, rank] padded with zeros to `max_rank`, stacked so that
one shrink and one expand product serve every part: A [parts * R, in] and a block-diagonal
B [out, parts * R]. The scaling (alpha / r) is folded into B when the adapter is written.

Rows are grouped by adapter (one shrink and expand per adapter present), except in a small
step holding several adapters, such as decodes: there every row goes through every slot at
once and a mask keeps each row's own slot: three ops however many adapters share the
step, since small steps are paid for by their number of ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.linear import Product

# (slot, row indices of the flat batch, or None for every row)
LoraGroup = tuple[int, torch.Tensor | None]


class LoraStep:
    """Which rows each adapter slot adapts in the current call; set before it, read by every
    projection. Rows of the base model belong to no group."""

    def __init__(self) -> None:
        self.groups: list[LoraGroup] = []
        self.row_slots: torch.Tensor | None = None  # [N] per row, when every slot is applied
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def set_groups(self, groups: list[LoraGroup], row_slots: torch.Tensor | None = None) -> None:
        self.groups, self.row_slots, self._masks = groups, row_slots, {}

    def mask(self, num_slots: int, slot_width: int, dtype: torch.dtype) -> torch.Tensor:
        """[N, num_slots * slot_width]: 1 in the columns of each row's own slot."""
        key = (num_slots, slot_width)
        if key not in self._masks:
            assert self.row_slots is not None
            columns = torch.arange(num_slots * slot_width, device=self.row_slots.device)
            owned = (columns // slot_width)[None, :] == self.row_slots[:, None]
            self._masks[key] = owned.to(dtype)
        return self._masks[key]


class LoraProjection:
    """Every slot's A and B for one weight of `part_widths` output rows per part."""

    def __init__(
        self,
        in_features: int,
        part_widths: Sequence[int],
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.in_features, self.max_rank = in_features, max_rank
        self.part_widths = tuple(part_widths)
        self.part_offsets = [sum(self.part_widths[:i]) for i in range(len(self.part_widths))]
        self.num_slots = max_loras
        self.slot_width = len(self.part_widths) * max_rank  # parts * R columns per slot
        out_features = sum(self.part_widths)
        width = max_loras * self.slot_width
        self.lora_a = torch.zeros(width, in_features, dtype=dtype, device=device)  # slot-major
        self.lora_b = torch.zeros(out_features, width, dtype=dtype, device=device)
        # Transposed views, made once (they follow every write): each slot's A.T [in, W] and
        # B.T [W, out], and every slot's; a step then runs only its products.
        self.all_a_t, self.all_b_t = self.lora_a.t(), self.lora_b.t()
        self.slot_a_t = [self.lora_a[self._columns(s)].t() for s in range(max_loras)]
        self.slot_b_t = [self.lora_b[:, self._columns(s)].t() for s in range(max_loras)]

    def _columns(self, slot: int) -> slice:
        return slice(slot * self.slot_width, (slot + 1) * self.slot_width)

    def write(self, slot: int, part: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Put one part's A [r, in] and scaled B [width, r] into `slot`."""
        rank, first = lora_a.shape[0], slot * self.slot_width + part * self.max_rank
        rows = slice(self.part_offsets[part], self.part_offsets[part] + self.part_widths[part])
        self.lora_a[first : first + rank] = lora_a.to(self.lora_a.dtype)
        self.lora_b[rows, first : first + rank] = lora_b.to(self.lora_b.dtype)

    def clear(self, slot: int) -> None:
        self.lora_a[self._columns(slot)].zero_()
        self.lora_b[:, self._columns(slot)].zero_()

    def add(self, x: torch.Tensor, out: torch.Tensor, step: LoraStep) -> torch.Tensor:
        """out [..., out] += each row's (x @ A.T) @ B.T under its own slot."""
        flat_x = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # [N, in]
        flat_out = out if out.is_contiguous() else out.contiguous()
        rows_out = flat_out if flat_out.dim() == 2 else flat_out.view(-1, flat_out.shape[-1])
        if step.row_slots is not None:
            mask = step.mask(self.num_slots, self.slot_width, flat_x.dtype)
            shrunk = torch.mm(flat_x, self.all_a_t) * mask  # [N, slots * parts * R]
            rows_out.addmm_(shrunk, self.all_b_t)  # [N, out]
            return flat_out
        for slot, rows in step.groups:
            lora_a_t, lora_b_t = self.slot_a_t[slot], self.slot_b_t[slot]
            if rows is None:
                rows_out.addmm_(torch.mm(flat_x, lora_a_t), lora_b_t)
            else:
                shrunk = torch.mm(flat_x.index_select(0, rows), lora_a_t)  # [n, parts * R]
                rows_out.index_add_(0, rows, torch.mm(shrunk, lora_b_t))  # [n, out]
        return flat_out


class LoraProduct:
    """A layer's product plus the LoRA delta of the weights that have a projection.

    Weights are recognised by identity, so a decoder keeps calling
    `product(x, weight, bias)` unchanged and any family whose layers go through their
    `product` can be adapted without knowing of LoRA.
    """

    def __init__(
        self, base: Product, projections: dict[int, LoraProjection], step: LoraStep
    ) -> None:
        self.base, self.projections, self.step = base, projections, step

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.base(x, weight, bias)
        if not self.step.groups:
            return out
        projection = self.projections.get(id(weight))
        return out if projection is None else projection.add(x, out, self.step)

    def __repr__(self) -> str:
        return f"LoraProduct({self.base!r}, {len(self.projections)} projections)"
