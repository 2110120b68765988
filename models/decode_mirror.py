"""Contiguous copies of the decoding sequences' keys and values, kept from step to step.

Decode attention on the torch path gathers every decoding sequence's cache blocks into
one padded tensor per layer before its SDPA call, so the K/V bytes are read, written and
read again every step. On the 2-core CPU host that gather took 13% of a GPT-2 small step
at 32 sequences of about 90 tokens, and 36% at 8 sequences of about 1,000 tokens.

The mirror keeps the decoding sequences' K/V per layer in slot-major tensors
[slots, kv_heads, capacity, head_dim], laid out like a static cache, so SDPA reads
them in place. A step writes each decoding sequence's new token into its slot; only a
sequence that joins the decode set (its prompt just finished, or it comes back after
missing a step) is copied in from its blocks. Heads come before positions so that each
(sequence, head) is one contiguous run: reading 32 sequences of 90 tokens cold from
memory, SDPA took 1.03 ms a GPT-2 small layer this way, 1.32 ms with positions first,
and the gather plus SDPA 1.9 ms.

The paged cache stays the one source of truth. Every token is written there as well,
and a sequence is dropped from the mirror as soon as it misses a step, so nothing the
engine does to a sequence's blocks (preemption, recompute, forks) can leave a stale
copy. The mirror never holds more than `budget_bytes`; a step it cannot hold, or too
small to pay for the bookkeeping, gathers as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.base import cache_slots

MIN_SLOTS = 8
# Below this many K/V bytes per layer the gather is cheap and the mirror's bookkeeping
# costs more than it saves. Offline on the 2-core host: GPT-2 small at 32 sequences of
# ~90 tokens (17 MiB a layer) +11%, at 8 (4.4 MiB) +3%, at 1 (0.6 MiB) +-0; the tiny
# GPT-2 (2 KiB a token) at 1 sequence -6%, at 64 (3 MiB) within noise.
MIN_LAYER_BYTES = 4 << 20


@dataclass
class MirrorStep:
    """One step's work on every layer's mirror, planned once.

    Slots 0..n-1 hold this step's decoding sequences; `order[s]` is the index, in the
    planner's input lists, of the sequence in slot s.
    """

    mirror: DecodeMirror
    order: list[int]
    span: int  # the longest sequence, this step's token included, in whole blocks
    mask: torch.Tensor  # [n, 1, 1, span] bool, True = attend
    moves: list[tuple[int, int, int]]  # (from slot, to slot, tokens) of kept sequences
    refill: Refill | None  # every token of the joining sequences
    stale_rows: torch.Tensor | None  # past the tokens of moved and joining sequences
    token_rows: torch.Tensor  # [n * kv_heads] rows of the mirror's [-1, D] view for the new token

    def keys_and_values(
        self,
        cache: tuple[torch.Tensor, torch.Tensor],
        new_keys: torch.Tensor,  # [n, kv_heads, D] in slot order
        new_values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring this layer's mirror up to date; its K and V views [n, kv_heads, span, D]."""
        return self.mirror.update_layer(self, cache, new_keys, new_values)


class DecodeMirror:
    def __init__(
        self,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        budget_bytes: int,
        min_layer_bytes: int | None = None,  # None: MIN_LAYER_BYTES
    ):
        k_cache = kv_cache[0][0]
        self.block_size = k_cache.shape[1]
        self.token_shape = tuple(k_cache.shape[2:])  # (kv_heads, head_dim)
        self.dtype, self.device = k_cache.dtype, k_cache.device
        self.bytes_per_token = 2 * len(kv_cache) * k_cache[0, 0].numel() * k_cache.element_size()
        self.budget_bytes = budget_bytes
        self.min_layer_bytes = MIN_LAYER_BYTES if min_layer_bytes is None else min_layer_bytes
        self._layer_of = {k.data_ptr(): i for i, (k, _) in enumerate(kv_cache)}
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._slots, self._capacity = 0, 0
        # seq id -> (slot, tokens held). A sequence is kept only while it decodes every
        # step, and only if it has exactly the tokens it is said to have: a step that stops
        # part-way (its requests fail) leaves every entry one token ahead of the truth.
        self._held: dict[int, tuple[int, int]] = {}

    @property
    def nbytes(self) -> int:
        return self._slots * self._capacity * self.bytes_per_token

    def plan(
        self,
        seq_ids: list[int],
        context_lens: list[int],
        block_tables: torch.Tensor,
        table_rows: list[int],
    ) -> MirrorStep | None:
        """This step's decodes: sequence seq_ids[i] has context_lens[i] tokens cached, one
        new, and its blocks in block_tables[table_rows[i]]. None when the mirror would not
        pay or does not fit the budget: the caller gathers from the cache instead."""
        num_tokens = max(context_lens, default=0) + 1
        layer_bytes = len(seq_ids) * num_tokens * self.bytes_per_token // len(self._layer_of)
        if layer_bytes < self.min_layer_bytes or not self._make_room(len(seq_ids), num_tokens):
            self.skip_step()
            return None
        return self._assign(seq_ids, context_lens, (block_tables, table_rows))

    def skip_step(self) -> None:
        """A step whose decodes do not use the mirror: everything it held goes stale."""
        self._held.clear()

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
            for _ in self._layer_of
        ]
        self._slots, self._capacity = slots, capacity

    def _assign(
        self,
        seq_ids: list[int],
        context_lens: list[int],
        tables: tuple[torch.Tensor, list[int]],
    ) -> MirrorStep:
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
        # a slot's positions past its sequence's tokens hold what its last holder left;
        # SDPA reads them (masked) up to the span, and a masked NaN still makes a row NaN
        stale = [(target, tokens) for _, target, tokens in moves]
        stale += [(slot, context_lens[i] + 1) for slot, i in joining]
        slot_order = [i for i in order if i is not None]
        lens = [context_lens[i] + 1 for i in slot_order]
        self._held = {seq_ids[i]: (slot, lens[slot]) for slot, i in enumerate(slot_order)}
        # padded to whole blocks, as the gather pads. In bfloat16 on the CPU, SDPA over a
        # sequence's exact length rounds differently from SDPA over a padded span: with
        # exact spans, 10 of 64 greedy requests alone differed from the same in a batch
        # (`bench.gpu_check --device cpu`), 1 of 64 with whole blocks
        span = -(-max(lens) // self.block_size) * self.block_size
        mask = torch.arange(span)[None, :] < torch.tensor(lens)[:, None]
        return MirrorStep(
            mirror=self,
            order=slot_order,
            span=span,
            mask=mask[:, None, None, :].to(self.device),
            moves=moves,
            refill=self._refills(joining, context_lens, tables),
            stale_rows=self._tail_rows(stale),
            token_rows=self._rows(torch.arange(num_seqs), torch.tensor(lens) - 1),
        )

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

    def _refills(
        self,
        joining: list[tuple[int, int]],
        context_lens: list[int],
        tables: tuple[torch.Tensor, list[int]],
    ) -> Refill | None:
        """Where every token of the joining sequences sits in the cache and goes in the mirror."""
        if not joining:
            return None
        slots: list[int] = []
        mirror_slots: list[int] = []
        positions: list[int] = []
        block_tables, table_rows = tables
        for slot, i in joining:
            num_tokens = context_lens[i] + 1
            blocks = block_tables[table_rows[i], : -(-num_tokens // self.block_size)].tolist()
            slots += cache_slots(blocks, 0, num_tokens, self.block_size)
            mirror_slots += [slot] * num_tokens
            positions += range(num_tokens)
        return Refill(
            cache_slots=torch.tensor(slots, device=self.device),
            mirror_rows=self._rows(torch.tensor(mirror_slots), torch.tensor(positions)),
        )

    def update_layer(
        self,
        step: MirrorStep,
        cache: tuple[torch.Tensor, torch.Tensor],
        new_keys: torch.Tensor,
        new_values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_mirror, v_mirror = self._buffers[self._layer_of[cache[0].data_ptr()]]
        self._update(k_mirror, cache[0], new_keys, step)
        self._update(v_mirror, cache[1], new_values, step)
        num_seqs = len(step.order)
        return k_mirror[:num_seqs, :, : step.span], v_mirror[:num_seqs, :, : step.span]

    def _update(
        self, mirror: torch.Tensor, cached: torch.Tensor, new: torch.Tensor, step: MirrorStep
    ) -> None:
        for source, target, tokens in step.moves:
            mirror[target, :, :tokens].copy_(mirror[source, :, :tokens])
        rows = mirror.view(-1, mirror.shape[-1])  # [slots * kv_heads * capacity, head_dim]
        if step.stale_rows is not None:
            rows.index_fill_(0, step.stale_rows, 0.0)
        if step.refill is not None:
            copied = cached.view(-1, *self.token_shape).index_select(0, step.refill.cache_slots)
            rows.index_copy_(0, step.refill.mirror_rows, copied.view(-1, rows.shape[1]))
        rows.index_copy_(0, step.token_rows, new.reshape(-1, rows.shape[1]))


@dataclass
class Refill:
    """Tokens copied in from the paged cache, one row per (token, kv head) in the mirror."""

    cache_slots: torch.Tensor  # [T] block * block_size + offset
    mirror_rows: torch.Tensor  # [T * kv_heads]


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
