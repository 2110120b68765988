"""A minimal stand-in for the engine's bookkeeping, to drive models through the paged cache.

It hands out cache blocks in a shuffled order (so block ids are never simply
sequential), builds the flat batch and `AttentionMetadata` of one step from a list
of (sequence id, new tokens), and runs the model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from models.base import AttentionMetadata, PagedModel


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    ours, reference = ours.detach().float(), reference.detach().float()
    return float((ours - reference).abs().max() / reference.abs().max())


@dataclass
class PagedSession:
    model: PagedModel
    block_size: int = 4
    num_blocks: int = 160
    seed: int = 0
    lengths: dict[int, int] = field(default_factory=dict)
    blocks: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = self.model.allocate_kv_cache(self.num_blocks, self.block_size)
        self.free = list(range(self.num_blocks))
        random.Random(self.seed).shuffle(self.free)

    def step(
        self, work: list[tuple[int, list[int]]], image_embeds: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Run one flat batch; returns each item's hidden states [len(tokens), hidden]."""
        metadata, positions = self.metadata(work)
        input_ids = torch.tensor([t for _, tokens in work for t in tokens], dtype=torch.int64)
        hidden = self.model.forward(input_ids, positions, metadata, self.cache, image_embeds)
        for seq, tokens in work:
            self.lengths[seq] = self.lengths.get(seq, 0) + len(tokens)
        return list(hidden.split(metadata.query_lens))

    def metadata(self, work: list[tuple[int, list[int]]]) -> tuple[AttentionMetadata, torch.Tensor]:
        context_lens = [self.lengths.get(seq, 0) for seq, _ in work]
        query_lens = [len(tokens) for _, tokens in work]
        slots: list[int] = []
        positions: list[int] = []
        for (seq, _), context, count in zip(work, context_lens, query_lens, strict=True):
            self._reserve(seq, context + count)
            for position in range(context, context + count):
                block = self.blocks[seq][position // self.block_size]
                slots.append(block * self.block_size + position % self.block_size)
                positions.append(position)
        seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
        width = max(len(self.blocks[seq]) for seq, _ in work)
        tables = [self.blocks[seq] + [0] * (width - len(self.blocks[seq])) for seq, _ in work]
        starts = [0]
        for count in query_lens:
            starts.append(starts[-1] + count)
        metadata = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            query_lens=query_lens,
            context_lens=context_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        return metadata, torch.tensor(positions, dtype=torch.int64)

    def _reserve(self, seq: int, length: int) -> None:
        owned = self.blocks.setdefault(seq, [])
        while len(owned) * self.block_size < length:
            owned.append(self.free.pop())
