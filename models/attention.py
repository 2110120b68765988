"""Paged attention over a block-structured KV cache: the torch path (CPU and CUDA).

Per layer the cache is a pair (K, V), each [num_blocks, block_size, num_kv_heads,
head_dim]. New keys and values are written through `slot_mapping`; attention follows
the step's plan (models/attention_inputs.py): one masked SDPA per decode group, one
causal SDPA per prefill chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.attention_inputs import AttentionInputs, DecodeGroup, MirroredDecodes, PrefillChunk

KVCache = tuple[torch.Tensor, torch.Tensor]


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
    cache: KVCache,  # this layer's
    attn_inputs: AttentionInputs,
    scale: float,
    layer: int,  # this layer's index, for the step's per-layer inputs
    sliding: bool = False,  # a sliding-window layer: attend with the plan's window masks
) -> torch.Tensor:  # [T, heads * D]
    """Write the new K/V into the cache, then attend every query to its sequence so far
    (to its window of it in a sliding-window layer)."""
    write_kv(cache, key, value, attn_inputs.slot_mapping)
    if attn_inputs.is_one_decode_group:
        (group,) = attn_inputs.decode_groups
        keys, values = _decode_kv(cache, group, layer, key, value)
        decode_mask = group.additive_mask_for(sliding, query.dtype)
        return _attend_decodes(query, keys, values, decode_mask, scale)
    out = query.new_empty(query.shape[0], query.shape[1] * query.shape[2])  # [T, heads * D]
    for group in attn_inputs.decode_groups:
        keys, values = _decode_kv(cache, group, layer, key, value)
        decode_mask = group.additive_mask_for(sliding, query.dtype)
        group_out = _attend_decodes(_rows(query, group.rows), keys, values, decode_mask, scale)
        if isinstance(group.rows, slice):
            out[group.rows] = group_out
        else:
            out.index_copy_(0, group.rows, group_out)
    for chunk in attn_inputs.prefills:
        rows = slice(chunk.start, chunk.end)
        mask = chunk.mask_for(sliding)
        out[rows] = _attend_prefill(query[rows], key[rows], value[rows], cache, chunk, mask, scale)
    return out


def _rows(tensor: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)


def _decode_kv(
    cache: KVCache,
    group: DecodeGroup,
    layer: int,
    key: torch.Tensor,  # [T, kv_heads, D], the whole batch's new keys
    value: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # each [n, kv_heads, span, D]
    if group.mirror is None:
        return _gather_decodes(cache, group)
    new_keys, new_values = _rows(key, group.rows), _rows(value, group.rows)
    return _read_mirror(group.mirror, layer, new_keys, new_values)


def _read_mirror(
    mirror: MirroredDecodes,
    layer: int,
    new_keys: torch.Tensor,  # [n, kv_heads, D] in slot order
    new_values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decodes' K and V in place, once this step's token is written beside the rest."""
    k_buffer, v_buffer = mirror.layers[layer]
    head_dim = k_buffer.shape[-1]
    num_seqs = len(mirror.seqs)
    k_buffer.view(-1, head_dim).index_copy_(0, mirror.token_rows, new_keys.reshape(-1, head_dim))
    v_buffer.view(-1, head_dim).index_copy_(0, mirror.token_rows, new_values.reshape(-1, head_dim))
    return k_buffer[:num_seqs, :, : mirror.span], v_buffer[:num_seqs, :, : mirror.span]


def _attend_decodes(
    query: torch.Tensor,  # [n, heads, D], the group's rows
    keys: torch.Tensor,  # [n, kv_heads, span, D]
    values: torch.Tensor,
    mask: torch.Tensor,  # [n, 1, 1, span], 0 where a query attends, -inf elsewhere
    scale: float,
) -> torch.Tensor:  # [n, heads * D]
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    # the heads sharing one KV head become that head's query rows: [n, kv_heads, group, D]
    grouped_query = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        grouped_query, keys, values, attn_mask=mask, scale=scale
    )  # [n, kv_heads, group, D]
    return out.reshape(num_seqs, num_heads * head_dim)


def _gather_decodes(cache: KVCache, group: DecodeGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's K and V, [n, kv_heads, span, D], copied out of their blocks."""
    k_cache, v_cache = cache
    assert group.block_ids is not None
    key_buffer, value_buffer = group.buffers_for(k_cache)
    keys = torch.index_select(k_cache, 0, group.block_ids, out=key_buffer)
    values = torch.index_select(v_cache, 0, group.block_ids, out=value_buffer)
    shape = (group.num_seqs, group.span, *k_cache.shape[2:])
    return keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)


def _attend_prefill(
    query: torch.Tensor,  # [q, heads, D]
    key: torch.Tensor,  # [q, kv_heads, D]
    value: torch.Tensor,
    cache: KVCache,
    chunk: PrefillChunk,
    mask: torch.Tensor | None,  # [q, seq_len] bool; None: causal over the new tokens
    scale: float,
) -> torch.Tensor:  # [q, heads * D]
    if chunk.block_ids is not None:
        key = _gather_sequence(cache[0], chunk.block_ids, chunk.seq_len)  # [seq_len, kv_heads, D]
        value = _gather_sequence(cache[1], chunk.block_ids, chunk.seq_len)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1).unsqueeze(0),  # [1, heads, q, D]
        key.transpose(0, 1).unsqueeze(0),  # [1, kv_heads, k, D]
        value.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # [1, heads, q, D]
    return out[0].transpose(0, 1).reshape(query.shape[0], -1)


def _gather_sequence(cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    blocks = cache.index_select(0, block_ids)  # [num_blocks, block_size, kv_heads, D]
    return blocks.view(-1, *cache.shape[2:])[:seq_len]
