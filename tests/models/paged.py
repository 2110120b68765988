"""A minimal stand-in for the engine's bookkeeping, to drive models through the paged cache.

It hands out cache blocks in a shuffled order (so block ids are never simply
sequential), builds the flat batch and the attention inputs of one step from a list
of (sequence id, new tokens), as the engine's runner does, and runs the model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from models.attention_inputs import AttentionInputs, plan_attention
from models.base import PagedModel


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
        attn_inputs, positions = self.attention_inputs(work)
        input_ids = torch.tensor([t for _, tokens in work for t in tokens], dtype=torch.int64)
        hidden = self.model.forward(input_ids, positions, attn_inputs, self.cache, image_embeds)
        for seq, tokens in work:
            self.lengths[seq] = self.lengths.get(seq, 0) + len(tokens)
        return list(hidden.split(attn_inputs.query_lens))

    def attention_inputs(
        self, work: list[tuple[int, list[int]]]
    ) -> tuple[AttentionInputs, torch.Tensor]:
        context_lens = [self.lengths.get(seq, 0) for seq, _ in work]
        query_lens = [len(tokens) for _, tokens in work]
        for (seq, _), context, count in zip(work, context_lens, query_lens, strict=True):
            self._reserve(seq, context + count)
        tables = [self.blocks[seq] for seq, _ in work]
        window = self.model.info.sliding_window
        attn_inputs = flat_inputs(context_lens, query_lens, tables, self.block_size, window)
        positions = [
            p for c, q in zip(context_lens, query_lens, strict=True) for p in range(c, c + q)
        ]
        return attn_inputs, torch.tensor(positions, dtype=torch.int64)

    def _reserve(self, seq: int, length: int) -> None:
        owned = self.blocks.setdefault(seq, [])
        while len(owned) * self.block_size < length:
            owned.append(self.free.pop())


def flat_inputs(
    context_lens: list[int],
    query_lens: list[int],
    tables: list[list[int]],
    block_size: int,
    sliding_window: int | None = None,
) -> AttentionInputs:
    """One step's attention inputs: sequence i adds query_lens[i] tokens after
    context_lens[i] cached ones, in the blocks tables[i] (padded with block 0)."""
    slots = [
        tables[s][p // block_size] * block_size + p % block_size
        for s, (c, q) in enumerate(zip(context_lens, query_lens, strict=True))
        for p in range(c, c + q)
    ]
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    return plan_attention(
        query_lens, context_lens, tables, slot_mapping, block_size, 0, None, sliding_window
    )
