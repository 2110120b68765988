"""Multimodal rotary positions (M-RoPE) of the Qwen-VL family.

Every token has three indices (temporal, height, width). Text tokens carry the same
index in all three; an image's tokens take their place on the image's merged patch
grid. The rotary frequencies are split into three sections (`mrope_section`), each
rotated by one of the three indices: in consecutive runs (Qwen2-VL, Qwen2.5-VL), or
interleaved t, h, w, t, h, w, ... (Qwen3-VL), the height and width indices taking
every third frequency up to three times their section's width and the temporal one
the rest. The tables are the 1-D ones of `RotaryEmbedding`; only the lookup differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.rope import RotaryEmbedding

SECTIONS = 3


class MultimodalRotaryEmbedding:
    """Looks up cos/sin for positions [3, T], each frequency by its own section's index."""

    def __init__(
        self, rope: RotaryEmbedding, mrope_section: Sequence[int], interleaved: bool = False
    ) -> None:
        self.rope, self.half = rope, rope.half
        if sum(mrope_section) != rope.half:
            raise ValueError(f"mrope_section {list(mrope_section)} does not sum to {rope.half}")
        sections = interleaved_sections if interleaved else consecutive_sections
        per_half = sections(mrope_section)  # [D / 2]
        self.section_of_column = torch.cat((per_half, per_half)).to(rope.cos.device)  # [D]

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[3, T] -> cos, signed_sin each [T, 1, D]; a [T] tensor means text everywhere."""
        if positions.dim() == 1:
            return self.rope.lookup(positions)
        return self._select(self.rope.cos, positions), self._select(self.rope.signed_sin, positions)

    def _select(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = table[positions]  # [3, T, D]
        columns = self.section_of_column.expand(1, rows.shape[1], -1)  # [1, T, D]
        return rows.gather(0, columns)[0].unsqueeze(1)  # [T, 1, D]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        return self.rope.apply(x, cos, signed_sin)


def consecutive_sections(mrope_section: Sequence[int]) -> torch.Tensor:
    """Section of each frequency: t for the first run of columns, then h, then w."""
    return torch.cat([torch.full((width,), i % SECTIONS) for i, width in enumerate(mrope_section)])


def interleaved_sections(mrope_section: Sequence[int]) -> torch.Tensor:
    """Section of each frequency as Qwen3-VL's `recomposition_frequencies` lays them out."""
    column = torch.arange(sum(mrope_section))
    section = column % SECTIONS
    spatial = (section > 0) & (column < torch.tensor(mrope_section)[section] * SECTIONS)
    return torch.where(spatial, section, 0)


def prompt_positions(
    num_tokens: int, image_starts: Sequence[int], image_grids: Sequence[tuple[int, int, int]]
) -> tuple[np.ndarray, int]:
    """Positions [3, num_tokens] of a prompt and the offset of the tokens after it.

    `image_grids` are the images' merged (t, h, w) grids, in prompt order. Text counts
    on from where the previous span stopped; an image starts at that index in all three
    sections and the text after it goes on from its largest index + 1, as transformers'
    `get_rope_index` does. A token p past the prompt sits at p + offset in all three.
    """
    pieces: list[np.ndarray] = []
    cursor = next_index = 0
    for start, (t, h, w) in zip(image_starts, image_grids, strict=True):
        pieces.append(_text(next_index, start - cursor))
        next_index += start - cursor
        grid = np.indices((t, h, w)).reshape(SECTIONS, -1)  # [3, t*h*w]
        pieces.append(grid + next_index)
        next_index += max(h, w)
        cursor = start + t * h * w
    pieces.append(_text(next_index, num_tokens - cursor))
    next_index += num_tokens - cursor
    return np.concatenate(pieces, axis=1), next_index - num_tokens


def _text(first: int, count: int) -> np.ndarray:
    return np.broadcast_to(np.arange(first, first + count), (SECTIONS, count))
