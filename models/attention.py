"""Paged attention over a block-structured KV cache: the torch path (CPU and CUDA).

Per layer the cache is a pair (K, V), each [num_blocks, block_size, num_kv_heads,
head_dim]. New keys and values are written through `slot_mapping`; attention reads
each sequence's blocks through its block table. One call serves a flat batch that
mixes prefill chunks (possibly after cached context) and single-token decodes.

Everything that depends only on the batch layout (which rows decode, the gather
indices, the masks) is planned once per step and kept in `attn_metadata.extra`, so
each layer spends its time on a handful of tensor ops:
- decodes are gathered and attended in one masked SDPA call per length group (the
  query heads that share a KV head act as that head's query rows, so GQA needs no
  copies of K/V); when the engine passes a decode mirror (models/decode_mirror.py),
  one group of similar lengths reads its contiguous copy in place instead;
- prefill chunks run one SDPA each, causal over the new tokens; a chunk after cached
  context reads that context back through its block table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.base import AttentionMetadata
from models.decode_mirror import MirrorStep

KVCache = tuple[torch.Tensor, torch.Tensor]

PLAN_KEY = "paged_attention_plan"
MAX_DECODE_GROUPS = 4
MIN_DECODE_GROUP = 4
MAX_MIRROR_PADDING = 2  # the mirror's padded span over the decodes' own tokens


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[KVCache]:
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(num_layers)
    ]


@dataclass
class DecodeGroup:
    """Single-token queries of sequences with similar lengths, attended in one call."""

    rows: slice | torch.Tensor  # their rows in the flat batch
    block_ids: torch.Tensor | None  # [num_seqs * blocks_per_seq] cache blocks, row-major per seq
    mask: torch.Tensor  # [num_seqs, 1, 1, span] bool, True = attend
    num_seqs: int
    mirror: MirrorStep | None = None  # read K/V from the decode mirror instead of gathering
    # K and V gathered per layer land in the same two buffers: a fresh multi-MB tensor
    # per layer costs page faults that took a third of the gather's time at B=64 on CPU
    gather_buffers: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def buffers_for(self, k_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [len(block_ids), block_size, kv_heads, D] buffers, made once per step."""
        buffers = self.gather_buffers
        if buffers is None or buffers[0].dtype != k_cache.dtype:
            assert self.block_ids is not None
            shape = (self.block_ids.shape[0], *k_cache.shape[1:])
            buffers = (k_cache.new_empty(shape), k_cache.new_empty(shape))
            self.gather_buffers = buffers
        return buffers


@dataclass
class PrefillChunk:
    """The new tokens of one sequence, causal among themselves, after `context_len` cached."""

    start: int
    end: int
    seq_len: int
    block_ids: torch.Tensor | None  # None: no cached context, attend to the new keys only
    mask: torch.Tensor | None  # [query_len, seq_len] bool when there is cached context


@dataclass
class AttentionPlan:
    num_tokens: int
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]

    @property
    def is_one_decode_group(self) -> bool:
        """The whole batch is one decode group in batch order: no row gather or scatter."""
        return not self.prefills and len(self.decode_groups) == 1 and _is_all_rows(self)


def _is_all_rows(plan: AttentionPlan) -> bool:
    rows = plan.decode_groups[0].rows
    return isinstance(rows, slice) and rows == slice(0, plan.num_tokens)


def prepare_attention(attn_metadata: AttentionMetadata, block_size: int) -> AttentionPlan:
    """Plan this step's attention once (idempotent); every layer reuses the plan."""
    plan = attn_metadata.extra.get(PLAN_KEY)
    if plan is None:
        plan = _build_plan(attn_metadata, block_size)
        attn_metadata.extra[PLAN_KEY] = plan
    return plan


def _build_plan(meta: AttentionMetadata, block_size: int) -> AttentionPlan:
    starts = [0]
    for query_len in meta.query_lens:
        starts.append(starts[-1] + query_len)
    decode_seqs = [i for i, query_len in enumerate(meta.query_lens) if query_len == 1]
    seq_lens = [c + q for c, q in zip(meta.context_lens, meta.query_lens, strict=True)]
    groups = _mirrored(meta, decode_seqs, seq_lens, starts) or [
        _decode_group(meta, members, starts, seq_lens, block_size)
        for members in _group_by_length(decode_seqs, seq_lens, block_size)
    ]
    prefills = [
        _prefill_chunk(meta, i, starts, seq_lens[i], block_size)
        for i, query_len in enumerate(meta.query_lens)
        if query_len > 1
    ]
    return AttentionPlan(num_tokens=starts[-1], decode_groups=groups, prefills=prefills)


def _group_by_length(seqs: list[int], seq_lens: list[int], block_size: int) -> list[list[int]]:
    """Split decodes so that no group pads a sequence to more than twice its block count.

    Few groups keep per-layer op counts low; splitting pays when lengths differ a lot.
    """
    if not seqs:
        return []
    blocks = {i: -(-seq_lens[i] // block_size) for i in seqs}
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


def _mirrored(
    meta: AttentionMetadata, decode_seqs: list[int], seq_lens: list[int], starts: list[int]
) -> list[DecodeGroup] | None:
    """The decodes as one group that reads the engine's decode mirror, or None to gather.

    The mirror pads every sequence to the longest, so it is used only while that at most
    doubles the attention's work; beyond, the decodes are gathered in groups of similar
    lengths.
    """
    mirror = meta.decode_mirror
    if mirror is None:
        return None
    lens = [seq_lens[i] for i in decode_seqs]
    if not lens or len(lens) * max(lens) > MAX_MIRROR_PADDING * sum(lens):
        mirror.skip_step()
        return None
    step = mirror.plan(
        [meta.seq_ids[i] for i in decode_seqs],
        [meta.context_lens[i] for i in decode_seqs],
        meta.block_tables,
        decode_seqs,
    )
    if step is None:
        return None
    members = [decode_seqs[i] for i in step.order]
    rows = _rows_of(members, starts, meta.block_tables.device)
    return [DecodeGroup(rows, None, step.mask, len(members), mirror=step)]


def _rows_of(members: list[int], starts: list[int], device: torch.device) -> slice | torch.Tensor:
    rows = [starts[i] for i in members]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _decode_group(
    meta: AttentionMetadata,
    members: list[int],
    starts: list[int],
    seq_lens: list[int],
    block_size: int,
) -> DecodeGroup:
    device = meta.block_tables.device
    lens = [seq_lens[i] for i in members]
    blocks_per_seq = -(-max(lens) // block_size)
    seq_rows = _rows_of(members, list(range(meta.num_seqs)), device)
    tables = meta.block_tables[seq_rows, :blocks_per_seq]  # [n, blocks_per_seq]
    positions = torch.arange(blocks_per_seq * block_size)
    mask = positions[None, :] < torch.tensor(lens)[:, None]  # [n, L]
    return DecodeGroup(
        rows=_rows_of(members, starts, device),
        block_ids=tables.reshape(-1).to(torch.int64),
        mask=mask[:, None, None, :].to(device, non_blocking=True),
        num_seqs=len(members),
    )


def _prefill_chunk(
    meta: AttentionMetadata, seq: int, starts: list[int], seq_len: int, block_size: int
) -> PrefillChunk:
    context_len = meta.context_lens[seq]
    chunk = PrefillChunk(starts[seq], starts[seq + 1], seq_len, None, None)
    if context_len == 0:
        return chunk
    device = meta.block_tables.device
    num_blocks = -(-seq_len // block_size)
    chunk.block_ids = meta.block_tables[seq, :num_blocks].to(torch.int64)
    query_positions = torch.arange(context_len, seq_len)  # [query_len]
    key_positions = torch.arange(seq_len)  # [seq_len]
    chunk.mask = (key_positions[None, :] <= query_positions[:, None]).to(device, non_blocking=True)
    return chunk


def write_kv(
    cache: KVCache, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values [T, kv_heads, D] at their slots."""
    k_cache, v_cache = cache
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)


def paged_attention(
    query: torch.Tensor,  # [T, heads, D]
    key: torch.Tensor,  # [T, kv_heads, D]
    value: torch.Tensor,  # [T, kv_heads, D]
    cache: KVCache,
    attn_metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, heads * D]
    """Write the new K/V into the cache, then attend every query to its sequence so far."""
    write_kv(cache, key, value, attn_metadata.slot_mapping)
    plan = prepare_attention(attn_metadata, block_size=cache[0].shape[1])
    if plan.is_one_decode_group:
        return _attend_decodes(query, cache, plan.decode_groups[0], scale, key, value)
    out = query.new_empty(query.shape[0], query.shape[1] * query.shape[2])  # [T, heads * D]
    for group in plan.decode_groups:
        group_out = _attend_decodes(_rows(query, group.rows), cache, group, scale, key, value)
        if isinstance(group.rows, slice):
            out[group.rows] = group_out
        else:
            out.index_copy_(0, group.rows, group_out)
    for chunk in plan.prefills:
        rows = slice(chunk.start, chunk.end)
        out[rows] = _attend_prefill(query[rows], key[rows], value[rows], cache, chunk, scale)
    return out


def _rows(tensor: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)


def _attend_decodes(
    query: torch.Tensor,  # [n, heads, D], the group's rows
    cache: KVCache,
    group: DecodeGroup,
    scale: float,
    key: torch.Tensor,  # [T, kv_heads, D], the whole batch's new keys
    value: torch.Tensor,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = query.shape
    if group.mirror is not None:
        new_keys, new_values = _rows(key, group.rows), _rows(value, group.rows)
        keys, values = group.mirror.keys_and_values(cache, new_keys, new_values)
    else:
        keys, values = _gather_decodes(cache, group)
    num_kv_heads = keys.shape[1]
    # the heads sharing one KV head become that head's query rows: [n, kv_heads, group, D]
    grouped_query = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        grouped_query,
        keys,  # [n, kv_heads, span, D]
        values,
        attn_mask=group.mask,
        scale=scale,
    )  # [n, kv_heads, group, D]
    return out.reshape(num_seqs, num_heads * head_dim)


def _gather_decodes(cache: KVCache, group: DecodeGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's K and V, [n, kv_heads, span, D], copied out of their blocks."""
    k_cache, v_cache = cache
    assert group.block_ids is not None
    key_buffer, value_buffer = group.buffers_for(k_cache)
    keys = torch.index_select(k_cache, 0, group.block_ids, out=key_buffer)
    values = torch.index_select(v_cache, 0, group.block_ids, out=value_buffer)
    shape = (group.num_seqs, group.mask.shape[-1], *k_cache.shape[2:])
    return keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)


def _attend_prefill(
    query: torch.Tensor,  # [q, heads, D]
    key: torch.Tensor,  # [q, kv_heads, D]
    value: torch.Tensor,
    cache: KVCache,
    chunk: PrefillChunk,
    scale: float,
) -> torch.Tensor:  # [q, heads * D]
    if chunk.block_ids is not None:
        key = _gather_sequence(cache[0], chunk.block_ids, chunk.seq_len)  # [seq_len, kv_heads, D]
        value = _gather_sequence(cache[1], chunk.block_ids, chunk.seq_len)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1).unsqueeze(0),  # [1, heads, q, D]
        key.transpose(0, 1).unsqueeze(0),  # [1, kv_heads, k, D]
        value.transpose(0, 1).unsqueeze(0),
        attn_mask=chunk.mask,
        is_causal=chunk.mask is None,
        scale=scale,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # [1, heads, q, D]
    return out[0].transpose(0, 1).reshape(query.shape[0], -1)


def _gather_sequence(cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    blocks = cache.index_select(0, block_ids)  # [num_blocks, block_size, kv_heads, D]
    return blocks.view(-1, *cache.shape[2:])[:seq_len]
