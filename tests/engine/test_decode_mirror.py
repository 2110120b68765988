"""The decode mirror against plain attention over each sequence's whole history.

A small world of sequences decodes step after step through two layers of paged
attention, with the churn an engine makes: sequences join, finish, miss a step and
come back with their blocks rewritten (preemption and recompute), grow past the
mirror's capacity, and share steps with prefill chunks. Every step's output must
match attention computed from scratch.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
import torch

from app.engine.decode_mirror import DecodeMirror
from app.engine.kv_cache import cache_slots
from models.attention import KVCache, allocate_kv_cache, paged_attention
from models.attention_inputs import AttentionInputs, plan_attention

BLOCK_SIZE = 4
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8
NUM_LAYERS, NUM_BLOCKS = 2, 512
SCALE = HEAD_DIM**-0.5


def _naive(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One query row [H, D] against a whole history [L, KV, D]: [H * D]."""
    group = HEADS // KV_HEADS
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    weights = (torch.einsum("hd,khd->hk", query, keys) * SCALE).softmax(-1)
    return torch.einsum("hk,khd->hd", weights, values).reshape(-1)


@dataclass
class World:
    """Sequences' K/V histories per layer, written into a paged cache as an engine would."""

    mirror_budget: int = 1 << 30
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    history: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    tables: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache: list[KVCache] = allocate_kv_cache(
            NUM_LAYERS,
            NUM_BLOCKS,
            BLOCK_SIZE,
            KV_HEADS,
            HEAD_DIM,
            torch.float32,
            torch.device("cpu"),
        )
        self.free = list(range(NUM_BLOCKS))
        self.rng.shuffle(self.free)
        self.mirror = DecodeMirror(self.cache, self.mirror_budget, min_layer_bytes=0)

    def _random(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def add(self, seq: int, length: int) -> None:
        """A sequence whose first `length` tokens are cached (a finished prefill)."""
        self.tables[seq] = [self.free.pop() for _ in range(NUM_BLOCKS // 16)]
        self.rewrite(seq, length)

    def rewrite(
        self, seq: int, length: int, history: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> None:
        """New K/V for the whole history, as recomputing a preempted sequence writes."""
        self.history[seq] = history or [
            (self._random(length, KV_HEADS, HEAD_DIM), self._random(length, KV_HEADS, HEAD_DIM))
            for _ in range(NUM_LAYERS)
        ]
        for layer, (keys, values) in enumerate(self.history[seq]):
            slots = torch.tensor([self._slot(seq, p) for p in range(length)], dtype=torch.int64)
            self.cache[layer][0].view(-1, KV_HEADS, HEAD_DIM)[slots] = keys
            self.cache[layer][1].view(-1, KV_HEADS, HEAD_DIM)[slots] = values

    def finish(self, seq: int) -> None:
        self.free += self.tables.pop(seq)
        del self.history[seq]

    def _slot(self, seq: int, position: int) -> int:
        return self.tables[seq][position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE

    def decode(
        self, seqs: Iterable[int], layers: int = NUM_LAYERS, mirror: bool = True
    ) -> tuple[AttentionInputs, list[torch.Tensor]]:
        """One step in which each of `seqs` decodes one token."""
        return self.step([(seq, 1) for seq in seqs], layers, mirror)

    def step(
        self, work: list[tuple[int, int]], layers: int = NUM_LAYERS, mirror: bool = True
    ) -> tuple[AttentionInputs, list[torch.Tensor]]:
        """Runs (sequence, new tokens) items through `layers` layers; checks each output
        row against plain attention and returns the attention inputs and every layer's
        output. Without `mirror`, the step runs as if the engine kept none."""
        attn_inputs = self._attention_inputs(work, mirror)
        context_lens, query_lens = attn_inputs.context_lens, attn_inputs.query_lens
        outputs = []
        for layer in range(layers):
            query = self._random(sum(query_lens), HEADS, HEAD_DIM)
            key, value = (self._random(sum(query_lens), KV_HEADS, HEAD_DIM) for _ in "kv")
            out = paged_attention(query, key, value, self.cache[layer], attn_inputs, SCALE, layer)
            outputs.append(out)
            start = 0
            for (seq, count), context in zip(work, context_lens, strict=True):
                keys, values = self.history[seq][layer]
                keys = torch.cat([keys, key[start : start + count]])
                values = torch.cat([values, value[start : start + count]])
                self.history[seq][layer] = (keys, values)
                for row in range(count):  # each query sees the history up to itself
                    end = context + row + 1
                    expected = _naive(query[start + row], keys[:end], values[:end])
                    torch.testing.assert_close(
                        out[start + row], expected, rtol=1e-5, atol=1e-5, equal_nan=True
                    )
                start += count
        return attn_inputs, outputs

    def _attention_inputs(self, work: list[tuple[int, int]], mirror: bool) -> AttentionInputs:
        """As the engine's runner prepares them."""
        context_lens = [self.history[seq][0][0].shape[0] for seq, _ in work]
        query_lens = [count for _, count in work]
        tables = [self.tables[seq] for seq, _ in work]
        slots = [
            slot
            for table, context, count in zip(tables, context_lens, query_lens, strict=True)
            for slot in cache_slots(table, context, context + count, BLOCK_SIZE)
        ]
        decodes = [i for i, count in enumerate(query_lens) if count == 1]
        seq_ids = [seq for seq, _ in work]
        mirrored = self.mirror.prepare(seq_ids, context_lens, tables, decodes) if mirror else None
        slot_mapping = torch.tensor(slots, dtype=torch.int64)
        return plan_attention(
            query_lens, context_lens, tables, slot_mapping, BLOCK_SIZE, 0, mirrored
        )


def _world(lengths: list[int], **options: int) -> World:
    """A world whose sequences 0, 1, ... have these many tokens cached."""
    world = World(**options)
    for seq, length in enumerate(lengths):
        world.add(seq, length)
    return world


def _mirrored(attn_inputs: AttentionInputs) -> bool:
    groups = attn_inputs.decode_groups
    return len(groups) == 1 and groups[0].mirror is not None


def test_decodes_with_churn_match_plain_attention() -> None:
    """Joins, finishes (the survivors move down), growth past capacity and slot count."""
    world, rng = World(), random.Random(1)
    next_seq = 0
    mirrored_steps = 0
    for step in range(60):
        while len(world.history) < (4 if step < 20 else 12 if step < 40 else 3):
            world.add(next_seq, rng.randint(20, 30))
            next_seq += 1
        if step % 7 == 3:  # one finishes: its slot frees up
            world.finish(rng.choice(sorted(world.history)))
        attn_inputs, _ = world.decode(sorted(world.history, key=lambda _: rng.random()))
        mirrored_steps += _mirrored(attn_inputs)
    assert mirrored_steps == 60
    assert world.mirror.nbytes > 0


def test_decodes_beside_prefill_chunks_match_plain_attention() -> None:
    world = _world([24, 25, 26, 27, 28, 29])
    world.decode(range(6))
    world.add(6, 8)  # a prompt chunk after cached context, between the decodes
    attn_inputs, _ = world.step([(0, 1), (1, 1), (6, 5), (2, 1), (3, 1), (4, 1), (5, 1)])
    assert _mirrored(attn_inputs)
    attn_inputs, _ = world.step([(5, 1), (6, 1), (4, 1), (0, 1), (2, 1), (1, 1), (3, 1)])
    assert _mirrored(attn_inputs)


def test_a_sequence_that_misses_a_step_is_read_again_from_its_blocks() -> None:
    """Preempted and recomputed to the same length: its blocks hold new values."""
    world = _world([20] * 4)
    world.decode(range(4))
    world.decode([0, 1, 2])  # sequence 3 is not scheduled
    world.rewrite(3, 21)
    attn_inputs, _ = world.decode(range(4))
    assert _mirrored(attn_inputs)
    world.add(4, 3)
    world.step([(4, 4)])  # a step without decodes
    world.rewrite(0, 23)  # the length it had
    attn_inputs, _ = world.decode(range(4))
    assert _mirrored(attn_inputs)


def test_a_step_that_stops_part_way_leaves_no_stale_copy() -> None:
    """Its requests fail in the engine; here the same decodes are run again."""
    world = _world([20] * 10)
    world.decode(range(10))
    survivors = [0, 1, 2, 7, 8, 9]  # 7, 8 and 9 move down to slots 3, 4 and 5...
    world.decode(survivors, layers=1)  # ...in layer 0 only
    for seq in survivors:  # the failed step's token is written again
        keys, values = world.history[seq][0]
        world.history[seq][0] = (keys[:-1], values[:-1])
    attn_inputs, _ = world.decode(survivors)
    assert _mirrored(attn_inputs)


def test_steps_without_the_mirror_leave_no_stale_copy() -> None:
    """A step that gathers (lengths far apart, or no mirror passed) writes blocks only."""
    world = _world([20] * 5)
    world.decode(range(5))
    world.decode(range(5), mirror=False)
    world.add(5, 120)  # padding the others to this one would triple the work
    attn_inputs, _ = world.decode(range(6))
    assert not _mirrored(attn_inputs)
    world.finish(5)
    attn_inputs, _ = world.decode(range(5))
    assert _mirrored(attn_inputs)


def test_what_a_slot_held_before_cannot_leak_into_its_next_holder() -> None:
    """A sequence whose K/V turned NaN leaves; shorter ones take its slot and the slots
    that moved. Their masked tail positions are read, and a masked NaN makes a row NaN."""
    world = _world([10] * 5 + [14])
    nan = torch.full((14, KV_HEADS, HEAD_DIM), float("nan"))
    world.rewrite(5, 14, [(nan, nan)] * NUM_LAYERS)
    attn_inputs, _ = world.decode(range(6))
    assert _mirrored(attn_inputs)
    world.finish(5)
    world.add(6, 8)
    attn_inputs, outputs = world.decode([0, 1, 2, 3, 4, 6])
    assert _mirrored(attn_inputs)
    assert not any(out.isnan().any() for out in outputs)


@pytest.mark.parametrize("budget_tokens", [0, 40, 200])
def test_the_mirror_stays_within_its_budget(budget_tokens: int) -> None:
    bytes_per_token = 2 * NUM_LAYERS * KV_HEADS * HEAD_DIM * 4
    world = _world([10] * 8, mirror_budget=budget_tokens * bytes_per_token)
    used = []
    for _ in range(12):
        attn_inputs, _ = world.decode(range(8))
        used.append(_mirrored(attn_inputs))
        assert world.mirror.nbytes <= world.mirror.budget_bytes
    # 8 sequences of 11-22 tokens: no room in 40 tokens, the first steps fit in 200
    assert used == {0: [False] * 12, 40: [False] * 12, 200: [True] * 12}[budget_tokens]
