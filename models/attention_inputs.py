"""What paged attention reads in one step, planned once by the runner before `forward`.

Everything that depends only on the batch layout (which rows decode, the gather
indices, the masks) is computed here from host lists, so that each layer spends its
time on a few tensor ops (models/attention.py): decodes go in one masked SDPA call per
group of similar lengths, reading K/V gathered from their blocks or in place from the
engine's contiguous copy (`MirroredDecodes`); each prefill chunk is one causal SDPA,
reading any cached context back through its block table. A decode group's mask is
made only when the torch path asks for it: the one-stream kernels never do.

Sliding-window layers (Gemma 3) get a second mask, `window_mask` (each query sees its
own key and the `window - 1` before it), planned only where a query reaches past the
window. Image tokens that attend both ways (Gemma 3) get chunk masks from
`with_bidirectional_spans`; a chunk must then hold the rest of every image it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

MAX_DECODE_GROUPS = 4
MIN_DECODE_GROUP = 4


@dataclass
class MirroredDecodes:
    """Decodes whose K/V the engine keeps contiguous per layer, one slot per sequence,
    already holding every token but this step's (app/engine/decode_mirror.py)."""

    seqs: list[int]  # the batch's decoding sequences, in slot order
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer K, V [slots, kv_heads, cap, D]
    token_rows: torch.Tensor  # [n * kv_heads] rows of a buffer's [-1, D] view for the new token
    span: int  # positions attention reads: the longest sequence, in whole blocks
    mask: torch.Tensor  # [n, 1, 1, span] bool, True = attend


@dataclass
class DecodeGroup:
    """Single-token queries of sequences with similar lengths, attended in one call."""

    rows: slice | torch.Tensor  # their rows in the flat batch
    block_ids: torch.Tensor | None  # [num_seqs * blocks_per_seq] cache blocks, row-major per seq
    lens: list[int]  # each member's tokens, this step's included: the keys it attends to
    span: int  # positions each member's attention reads: the group's longest, in whole blocks
    mirror: MirroredDecodes | None = None  # read K/V in place instead of gathering
    window_mask: torch.Tensor | None = None  # like mask, for sliding-window layers
    # NOTE: every layer gathers into the same two buffers: a fresh multi-MB tensor per
    # layer costs page faults (BENCHMARKS.md, history)
    gather_buffers: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # the mask once made (`mask`), or the mirror's own
    cached_mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.lens)

    @property
    def mask(self) -> torch.Tensor:
        """[num_seqs, 1, 1, span] bool, True = attend. Made on first use: the one-stream
        decode kernels read `lens` and the blocks, never a mask."""
        if self.cached_mask is None:
            positions = torch.arange(self.span)
            mask = positions[None, :] < torch.tensor(self.lens)[:, None]  # [n, span]
            device = mask.device if self.block_ids is None else self.block_ids.device
            self.cached_mask = mask[:, None, None, :].to(device, non_blocking=True)
        return self.cached_mask

    def buffers_for(self, k_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [len(block_ids), block_size, kv_heads, D] buffers, made once per step."""
        buffers = self.gather_buffers
        if buffers is None or buffers[0].dtype != k_cache.dtype:
            assert self.block_ids is not None
            shape = (self.block_ids.shape[0], *k_cache.shape[1:])
            buffers = (k_cache.new_empty(shape), k_cache.new_empty(shape))
            self.gather_buffers = buffers
        return buffers

    # (sliding, dtype) -> the mask as 0 / -inf, made once per step: SDPA would otherwise
    # turn the bool mask into this in every layer
    additive_masks: dict[tuple[bool, torch.dtype], torch.Tensor] = field(
        default_factory=dict, repr=False
    )

    def mask_for(self, sliding: bool) -> torch.Tensor:
        return self.window_mask if sliding and self.window_mask is not None else self.mask

    def additive_mask_for(self, sliding: bool, dtype: torch.dtype) -> torch.Tensor:
        """mask_for(sliding) [n, 1, 1, span] as 0 where it attends and -inf elsewhere."""
        key = (sliding, dtype)
        if key not in self.additive_masks:
            allowed = self.mask_for(sliding)
            blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self.additive_masks[key] = blocked.masked_fill_(~allowed, float("-inf"))
        return self.additive_masks[key]


@dataclass
class PrefillChunk:
    """The new tokens of one sequence, causal among themselves, after `context_len` cached."""

    start: int
    end: int
    seq_len: int
    block_ids: torch.Tensor | None  # None: no cached context, attend to the new keys only
    mask: torch.Tensor | None  # [query_len, seq_len] bool when there is cached context
    window_mask: torch.Tensor | None = None  # [query_len, seq_len] for sliding-window layers

    def mask_for(self, sliding: bool) -> torch.Tensor | None:
        return self.window_mask if sliding and self.window_mask is not None else self.mask


@dataclass
class AttentionInputs:
    """One step's attention, planned: sequence i adds `query_lens[i]` tokens (a prefill
    chunk, or 1 for a decode) after `context_lens[i]` tokens already cached."""

    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset of each new token
    query_lens: list[int]
    context_lens: list[int]
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    # the whole batch is one decode group in batch order: no row gather or scatter
    is_one_decode_group: bool
    sliding_window: int | None = None  # the window the window masks were planned for


def plan_attention(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    slot_mapping: torch.Tensor,
    block_size: int,
    padding_block: int,
    mirrored: MirroredDecodes | None = None,
    sliding_window: int | None = None,
) -> AttentionInputs:
    """The step's attention inputs. `block_tables[i]` holds sequence i's blocks; shorter
    tables are padded with `padding_block`, whose K/V must stay finite (attention reads
    them, masked, and a masked NaN still turns a row NaN). `sliding_window`: the model's
    local layers' window, None for a model without one."""
    device = slot_mapping.device
    layout = _Layout(
        query_lens, context_lens, block_tables, block_size, padding_block, device, sliding_window
    )
    decodes = [i for i, query_len in enumerate(query_lens) if query_len == 1]
    if mirrored is not None:
        assert sorted(mirrored.seqs) == decodes, "the mirror must hold every decode"
        groups = [_mirror_group(layout, mirrored)]
    else:
        groups = [layout.decode_group(m) for m in _group_by_length(decodes, layout)]
    prefills = [layout.prefill_chunk(i) for i, q in enumerate(query_lens) if q > 1]
    return AttentionInputs(
        slot_mapping=slot_mapping,
        query_lens=query_lens,
        context_lens=context_lens,
        decode_groups=groups,
        prefills=prefills,
        is_one_decode_group=not prefills and len(groups) == 1 and layout.is_whole(groups[0]),
        sliding_window=sliding_window,
    )


class _Layout:
    """The batch's rows, lengths and block tables; the tensors a group or chunk needs."""

    def __init__(
        self,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        padding_block: int,
        device: torch.device,
        window: int | None,  # the local layers' window, when the model has one
    ) -> None:
        self.context_lens, self.block_tables = context_lens, block_tables
        self.block_size, self.padding_block, self.device = block_size, padding_block, device
        self.window = window
        self.starts = [0]
        for query_len in query_lens:
            self.starts.append(self.starts[-1] + query_len)
        self.seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]

    def is_whole(self, group: DecodeGroup) -> bool:
        """The group is the whole batch in batch order."""
        return isinstance(group.rows, slice) and group.rows == slice(0, self.starts[-1])

    def rows_of(self, seqs: list[int]) -> slice | torch.Tensor:
        rows = [self.starts[i] for i in seqs]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    def _blocks(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.int64, device=self.device)

    def decode_group(self, members: list[int]) -> DecodeGroup:
        lens = [self.seq_lens[i] for i in members]
        blocks_per_seq = -(-max(lens) // self.block_size)
        tables = [self.block_tables[i][:blocks_per_seq] for i in members]
        padded = [b for t in tables for b in t + [self.padding_block] * (blocks_per_seq - len(t))]
        span = blocks_per_seq * self.block_size
        return DecodeGroup(
            rows=self.rows_of(members),
            block_ids=self._blocks(padded),
            lens=lens,
            span=span,
            window_mask=self.window_mask(lens, span),
        )

    def prefill_chunk(self, seq: int) -> PrefillChunk:
        context_len, seq_len = self.context_lens[seq], self.seq_lens[seq]
        chunk = PrefillChunk(self.starts[seq], self.starts[seq + 1], seq_len, None, None)
        if self.window is not None and seq_len > self.window:
            chunk.window_mask = _window_mask(chunk, self.window).to(self.device, non_blocking=True)
        if context_len == 0:
            return chunk
        chunk.block_ids = self._blocks(self.block_tables[seq][: -(-seq_len // self.block_size)])
        query_positions = torch.arange(context_len, seq_len)  # [query_len]
        key_positions = torch.arange(seq_len)  # [seq_len]
        mask = key_positions[None, :] <= query_positions[:, None]
        chunk.mask = mask.to(self.device, non_blocking=True)
        return chunk

    def window_mask(self, lens: list[int], span: int) -> torch.Tensor | None:
        """[n, 1, 1, span] decode mask of each sequence's last `window` positions, from the
        host's lengths; None where none is longer than the window (the plain mask is it)."""
        if self.window is None or max(lens) <= self.window:
            return None
        positions = torch.arange(span)[None, :]  # [1, span]
        seq_lens = torch.tensor(lens)[:, None]  # [n, 1]
        mask = (positions < seq_lens) & (positions >= seq_lens - self.window)
        return mask[:, None, None, :].to(self.device, non_blocking=True)


def _window_mask(chunk: PrefillChunk, window: int) -> torch.Tensor:
    """[query_len, seq_len]: causal, and no key `window` or more positions back."""
    query_positions = torch.arange(chunk.seq_len - (chunk.end - chunk.start), chunk.seq_len)
    distance = query_positions[:, None] - torch.arange(chunk.seq_len)[None, :]
    return (distance >= 0) & (distance < window)


def _mirror_group(layout: _Layout, mirrored: MirroredDecodes) -> DecodeGroup:
    lens = [layout.seq_lens[i] for i in mirrored.seqs]
    return DecodeGroup(
        rows=layout.rows_of(mirrored.seqs),
        block_ids=None,
        lens=lens,
        span=mirrored.span,
        mirror=mirrored,
        window_mask=layout.window_mask(lens, mirrored.span),
        cached_mask=mirrored.mask,
    )


def _group_by_length(seqs: list[int], layout: _Layout) -> list[list[int]]:
    """Split decodes so that no group pads a sequence to more than twice its block count.

    Few groups keep per-layer op counts low; splitting pays when lengths differ a lot.
    """
    if not seqs:
        return []
    blocks = {i: -(-layout.seq_lens[i] // layout.block_size) for i in seqs}
    if max(blocks.values()) <= 2 * min(blocks.values()):
        return [seqs]  # one group, batch order kept
    order = sorted(seqs, key=lambda s: -blocks[s])
    groups = [[order[0]]]
    for position, seq in enumerate(order[1:], start=1):
        split = (
            len(groups) < MAX_DECODE_GROUPS
            and len(groups[-1]) >= MIN_DECODE_GROUP
            and len(order) - position >= MIN_DECODE_GROUP
            and 2 * blocks[seq] <= blocks[groups[-1][0]]
        )
        if split:
            groups.append([])
        groups[-1].append(seq)
    return groups


def with_bidirectional_spans(inputs: AttentionInputs, is_span: torch.Tensor) -> AttentionInputs:
    """The step's inputs where each run of consecutive `is_span` rows ([T] bool) of a
    prefill chunk also attends to its own later rows (transformers' `blockwise_overlay`:
    causal OR same span; and, in sliding-window layers, within the window)."""
    prefills = [_with_spans(chunk, is_span, inputs.sliding_window) for chunk in inputs.prefills]
    return replace(inputs, prefills=prefills)


def _with_spans(chunk: PrefillChunk, is_span: torch.Tensor, window: int | None) -> PrefillChunk:
    in_span = is_span[chunk.start : chunk.end]  # [query_len]
    if not bool(in_span.any()):
        return chunk
    query_len = chunk.end - chunk.start
    starts = in_span & ~_previous(in_span)
    span_ids = torch.where(in_span, starts.cumsum(0), 0)  # [query_len], 0: not in a span
    key_span_ids = _after_zeros(span_ids, chunk.seq_len - query_len)  # [seq_len]
    same_span = (span_ids[:, None] == key_span_ids[None, :]) & in_span[:, None]
    query_positions = torch.arange(chunk.seq_len - query_len, chunk.seq_len, device=is_span.device)
    distance = query_positions[:, None] - torch.arange(chunk.seq_len, device=is_span.device)
    mask = (distance >= 0) | same_span  # [query_len, seq_len]
    window_mask = (
        None if chunk.window_mask is None or window is None else mask & (distance < window)
    )
    return replace(chunk, mask=mask, window_mask=window_mask)


def _previous(flags: torch.Tensor) -> torch.Tensor:
    """Each row's predecessor's flag (False for the first)."""
    return torch.cat([flags.new_zeros(1), flags[:-1]])


def _after_zeros(values: torch.Tensor, count: int) -> torch.Tensor:
    """`count` zeros, then `values`."""
    return torch.cat([values.new_zeros(count), values])
