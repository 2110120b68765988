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
        for (seq, _), context, count in zip(work, context_lens, query_lens, strict=True):
            self._reserve(seq, context + count)
        tables = [self.blocks[seq] for seq, _ in work]
        metadata = flat_metadata(context_lens, query_lens, tables, self.block_size)
        positions = [
            p for c, q in zip(context_lens, query_lens, strict=True) for p in range(c, c + q)
        ]
        return metadata, torch.tensor(positions, dtype=torch.int64)

    def _reserve(self, seq: int, length: int) -> None:
        owned = self.blocks.setdefault(seq, [])
        while len(owned) * self.block_size < length:
            owned.append(self.free.pop())


def flat_metadata(
    context_lens: list[int], query_lens: list[int], tables: list[list[int]], block_size: int
) -> AttentionMetadata:
    """One step's metadata: sequence i adds query_lens[i] tokens after context_lens[i]
    cached ones, in the blocks tables[i]."""
    slots = [
        tables[s][p // block_size] * block_size + p % block_size
        for s, (c, q) in enumerate(zip(context_lens, query_lens, strict=True))
        for p in range(c, c + q)
    ]
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    starts = [0]
    for count in query_lens:
        starts.append(starts[-1] + count)
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens=query_lens,
        context_lens=context_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
