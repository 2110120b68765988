"""Contiguous copies of the decoding sequences' keys and values, kept from step to step.

Decode attention on the torch path otherwise gathers every decoding sequence's cache
blocks into one padded tensor per layer, each step. The mirror keeps them per layer in
[slots, kv_heads, capacity, head_dim] tensors, laid out like a static cache, so SDPA
reads them in place; heads come before positions so that each (sequence, head) is one
contiguous run. Each step the model writes one new token per slot; only a sequence that
joins the decode set (its prompt just finished, or it comes back after missing a step)
is copied in from its blocks, here, before `forward`. BENCHMARKS.md's history has the
measurements behind the layout and the thresholds.

The paged cache stays the one source of truth: every token is written there as well,
and a sequence is dropped from the mirror as soon as it misses a step, so nothing the
engine does to a sequence's blocks (preemption, recompute, forks) can leave a stale
copy. The mirror never holds more than `budget_bytes`; a step it cannot hold, or too
small to pay for the bookkeeping, gathers instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.engine.kv_cache import cache_slots
from models.attention import KVCache
from models.attention_inputs import MirroredDecodes

MIN_SLOTS = 8
# Below this many K/V bytes per layer the gather is cheap and the bookkeeping costs more
# than it saves.
MIN_LAYER_BYTES = 4 << 20
MAX_PADDING = 2  # the padded span over the decodes' own tokens, at most


@dataclass
class _SlotPlan:
    """Where this step's decodes sit: `order[s]` is the decode (its index in the planner's
    lists) in slot s."""

    order: list[int]
    lens: list[int]  # per slot, tokens held once this step's token is written
    moves: list[tuple[int, int, int]]  # (from slot, to slot, tokens) of kept sequences
    joining: list[tuple[int, int]]  # (slot, decode) of the sequences copied in


class DecodeMirror:
    def __init__(
        self,
        kv_cache: list[KVCache],
        budget_bytes: int,
        min_layer_bytes: int | None = None,  # None: MIN_LAYER_BYTES
    ):
        k_cache = kv_cache[0][0]
        self._kv_cache = kv_cache
        self.block_size = k_cache.shape[1]
        self.token_shape = tuple(k_cache.shape[2:])  # (kv_heads, head_dim)
        self.dtype, self.device = k_cache.dtype, k_cache.device
        self.bytes_per_token = 2 * len(kv_cache) * k_cache[0, 0].numel() * k_cache.element_size()
        self.budget_bytes = budget_bytes
        self.min_layer_bytes = MIN_LAYER_BYTES if min_layer_bytes is None else min_layer_bytes
        self._buffers: list[KVCache] = []
        self._slots, self._capacity = 0, 0
        # seq id -> (slot, tokens held). A sequence is kept only while it decodes every
        # step, and only if it has exactly the tokens it is said to have: a step that stops
        # part-way (its requests fail) leaves every entry one token ahead of the truth.
        self._held: dict[int, tuple[int, int]] = {}

    @property
    def nbytes(self) -> int:
        return self._slots * self._capacity * self.bytes_per_token

    def prepare(
        self,
        seq_ids: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        decodes: list[int],
    ) -> MirroredDecodes | None:
        """This step's decodes (indices into the per-sequence lists), copied up to date but
        for their new token; None when the mirror would not pay or fit: they gather."""
        lens = [context_lens[i] + 1 for i in decodes]
        if not self._pays(lens) or not self._make_room(len(lens), max(lens)):
            self._held.clear()  # the decodes do not use it: everything held goes stale
            return None
        plan = self._assign([seq_ids[i] for i in decodes], [context_lens[i] for i in decodes])
        self._copy_in(plan, [block_tables[i] for i in decodes])
        # NOTE: padded to whole blocks, as the gather pads: in bf16 SDPA rounds differently
        # over other spans, and a request alone would part from the same one in a batch
        span = -(-max(lens) // self.block_size) * self.block_size
        mask = torch.arange(span)[None, :] < torch.tensor(plan.lens)[:, None]  # [n, span]
        positions = torch.tensor(plan.lens) - 1
        return MirroredDecodes(
            seqs=[decodes[i] for i in plan.order],
            layers=self._buffers,
            token_rows=self._rows(torch.arange(len(lens)), positions),
            span=span,
            mask=mask[:, None, None, :].to(self.device),
        )

    def _pays(self, lens: list[int]) -> bool:
        """Padding every sequence to the longest must at most double the attention's work,
        and the K/V must be big enough that a gather would cost more than the bookkeeping."""
        if not lens or len(lens) * max(lens) > MAX_PADDING * sum(lens):
            return False
        layer_bytes = len(lens) * max(lens) * self.bytes_per_token // len(self._kv_cache)
        return layer_bytes >= self.min_layer_bytes

    def _make_room(self, num_seqs: int, num_tokens: int) -> bool:
        tokens = -(-num_tokens // self.block_size) * self.block_size
        if num_seqs <= self._slots and tokens <= self._capacity:
            return True
        # grow by doubling, so that a growing batch or sequence copies itself in rarely
        slots = max(self._slots, MIN_SLOTS, _power_of_two(num_seqs))
        capacity = max(self._capacity, self.block_size * _power_of_two(tokens // self.block_size))
        if slots * capacity * self.bytes_per_token > self.budget_bytes:
            slots, capacity = num_seqs, tokens
            if slots * capacity * self.bytes_per_token > self.budget_bytes:
                self._allocate(0, 0)
                return False
        self._allocate(slots, capacity)
        return True

    def _allocate(self, slots: int, capacity: int) -> None:
        self._buffers = []  # the old ones go first, so that both never exist at once
        self._held.clear()
        num_kv_heads, head_dim = self.token_shape
        shape = (slots, num_kv_heads, capacity, head_dim)
        self._buffers = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in self._kv_cache
        ]
        self._slots, self._capacity = slots, capacity

    def _assign(self, seq_ids: list[int], context_lens: list[int]) -> _SlotPlan:
        """Slots 0..n-1 for this step's decodes: kept sequences stay where they are or move
        down into a hole; the others join in the free slots."""
        num_seqs = len(seq_ids)
        index_of = {seq: i for i, seq in enumerate(seq_ids)}
        kept = {
            seq: slot
            for seq, (slot, held) in self._held.items()
            if seq in index_of and held == context_lens[index_of[seq]]
        }
        order: list[int | None] = [None] * num_seqs
        for seq, slot in kept.items():
            if slot < num_seqs:
                order[slot] = index_of[seq]
        free = iter([slot for slot in range(num_seqs) if order[slot] is None])
        moves = []
        for seq, slot in kept.items():
            if slot >= num_seqs:  # the decode set shrank: fill a hole below n
                target = next(free)
                moves.append((slot, target, context_lens[index_of[seq]]))
                order[target] = index_of[seq]
        joining = [(next(free), i) for i, seq in enumerate(seq_ids) if seq not in kept]
        for slot, i in joining:
            order[slot] = i
        slot_order = [i for i in order if i is not None]
        lens = [context_lens[i] + 1 for i in slot_order]
        self._held = {seq_ids[i]: (slot, lens[slot]) for slot, i in enumerate(slot_order)}
        return _SlotPlan(slot_order, lens, moves, joining)

    def _copy_in(self, plan: _SlotPlan, block_tables: list[list[int]]) -> None:
        """Every layer's moves, cleared tails and joining sequences' tokens."""
        if not plan.moves and not plan.joining:
            return  # every sequence kept its slot: the model writes the new tokens
        # NOTE: a slot's positions past its sequence's tokens hold what its last holder
        # left; SDPA reads them (masked) up to the span, and a masked NaN makes a row NaN
        stale = [(target, tokens) for _, target, tokens in plan.moves]
        stale += [(slot, plan.lens[slot] - 1) for slot, _ in plan.joining]
        stale_rows = self._tail_rows(stale)
        refill = self._refill(plan, block_tables)
        for buffers, cached in zip(self._buffers, self._kv_cache, strict=True):
            for mirror, cache in zip(buffers, cached, strict=True):
                for source, target, tokens in plan.moves:
                    mirror[target, :, :tokens].copy_(mirror[source, :, :tokens])
                rows = mirror.view(-1, mirror.shape[-1])  # [slots * kv_heads * capacity, D]
                if stale_rows is not None:
                    rows.index_fill_(0, stale_rows, 0.0)
                if refill is not None:
                    copied = cache.view(-1, *self.token_shape).index_select(0, refill[0])
                    rows.index_copy_(0, refill[1], copied.view(-1, rows.shape[1]))

    def _rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows of a layer's mirror seen as [-1, head_dim]: one per (token, kv head)."""
        heads = torch.arange(self.token_shape[0])
        rows = (slots[:, None] * self.token_shape[0] + heads) * self._capacity + positions[:, None]
        return rows.reshape(-1).to(self.device)

    def _tail_rows(self, slot_tokens: list[tuple[int, int]]) -> torch.Tensor | None:
        """The mirror rows of every slot's positions from `tokens` to the capacity."""
        slots = [slot for slot, tokens in slot_tokens for _ in range(tokens, self._capacity)]
        positions = [p for _, tokens in slot_tokens for p in range(tokens, self._capacity)]
        if not slots:
            return None
        return self._rows(torch.tensor(slots), torch.tensor(positions))

    def _refill(
        self, plan: _SlotPlan, block_tables: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cache slots [N] of the joining sequences' cached tokens, and the mirror rows
        [N * kv_heads] they go to."""
        slots: list[int] = []
        mirror_slots: list[int] = []
        positions: list[int] = []
        for slot, i in plan.joining:
            num_tokens = plan.lens[slot] - 1  # this step's token comes from the model
            slots += cache_slots(block_tables[i], 0, num_tokens, self.block_size)
            mirror_slots += [slot] * num_tokens
            positions += range(num_tokens)
        if not slots:
            return None
        mirror_rows = self._rows(torch.tensor(mirror_slots), torch.tensor(positions))
        return torch.tensor(slots, device=self.device), mirror_rows


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
