"""Paged KV blocks: allocation, ref counts and the prefix cache. No torch.

A block holds `block_size` consecutive tokens of one sequence. Blocks are
ref-counted so that sequences can share them: the samples of one request
share their prompt's blocks, and any request whose leading blocks equal
blocks computed before reuses them through the prefix cache.

A full, computed block is keyed by a chain hash over (the previous block's
hash, its token ids, the content hashes of the images whose tokens it holds),
so one key names the whole prefix up to and including that block. The chain starts
from the sequence's LoRA adapter, so no block is shared across adapters. When its
last user lets go, a cached block stays in the cache (and counts as free) in
least-recently-used order, and is evicted only when a fresh block is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from app.engine.sequence import Sequence


class Block:
    __slots__ = ("block_hash", "block_id", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: bytes | None = None


def chain_hash(parent_hash: bytes, token_ids: list[int], image_hashes: list[str]) -> bytes:
    """The cache key of one full block; collision-resistant, so no token check is needed."""
    digest = hashlib.blake2b(parent_hash, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    for image_hash in image_hashes:
        digest.update(b"\x00img:" + image_hash.encode())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._cached: dict[bytes, int] = {}  # chain hash -> block id
        self.prefix_cache_queries = 0  # tokens looked up, cumulative
        self.prefix_cache_hits = 0  # tokens found, cumulative

    # ---- accounting -------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no live sequence holds, cached ones included."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    # ---- admission ----------------------------------------------------------
    def try_allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        Returns False, changing nothing, when they do not fit.
        """
        hit_ids = self._match_prefix(seq)
        num_new = seq.num_blocks_needed(self.block_size) - len(hit_ids)
        num_hits_already_free = sum(1 for b in hit_ids if self.blocks[b].ref_count == 0)
        if num_new > self.num_free_blocks - num_hits_already_free:
            return False
        for block_id in hit_ids:
            self._take(block_id)
        seq.block_table = hit_ids + [self._take_fresh() for _ in range(num_new)]
        num_hit_tokens = len(hit_ids) * self.block_size
        seq.num_computed_tokens = num_hit_tokens
        seq.num_registered_blocks = len(hit_ids)
        if not seq.was_admitted:
            seq.num_cached_tokens = num_hit_tokens
            seq.was_admitted = True
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return True

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks equal to the sequence's leading blocks, stopping short of its last token.

        The last token is always recomputed so that the step has logits to sample from.
        """
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(seq, max_blocks)
        hit_ids: list[int] = []
        for block_hash in hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hit_ids.append(block_id)
        return hit_ids

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Chain hashes of the first `num_blocks` full blocks, extending the memo on `seq`."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else seq.cache_salt
            images = [span.image.content_hash for span in seq.images_in(start, start + size)]
            hashes.append(chain_hash(parent, seq.token_ids[start : start + size], images))
        return hashes[:num_blocks]

    # ---- growth -------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        """Whether the slot for the sequence's last token can be had (at most one block)."""
        return not self._needs_block(seq) or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence) -> tuple[int, int] | None:
        """Make the slot of the last token writable; returns a (src, dst) block copy if needed.

        A new block is added when the token starts one; a last block shared with a
        forked sample is copied first (copy on write), so writes never reach other
        sequences' blocks.
        """
        last_pos = seq.num_tokens - 1
        if last_pos >= len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take_fresh())
            return None
        last_block = self.blocks[seq.block_table[-1]]
        if last_block.ref_count == 1:
            return None
        new_id = self._take_fresh()
        self._release(last_block.block_id)
        seq.block_table[-1] = new_id
        return last_block.block_id, new_id

    def _needs_block(self, seq: Sequence) -> bool:
        if seq.num_tokens > len(seq.block_table) * self.block_size:
            return True
        return self.blocks[seq.block_table[-1]].ref_count > 1

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share every block of `parent` (its prompt)."""
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = parent.num_registered_blocks
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks, tail first so that prefixes stay cached longest."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # ---- prefix cache registration ------------------------------------------
    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Key the sequence's full, computed blocks so that later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        first_new = seq.num_registered_blocks
        if num_full <= first_new:
            return
        hashes = self._block_hashes(seq, num_full)
        for i in range(first_new, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash = hashes[i]
                self._cached[hashes[i]] = block.block_id
        seq.num_registered_blocks = num_full

    # ---- the free pools -----------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._free_cached.pop(block_id)
        block.ref_count += 1

    def _take_fresh(self) -> int:
        """An empty block: an uncached free one, else the least recently used cached one."""
        if self._free_uncached:
            block_id = self._free_uncached.popleft()
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            evicted = self.blocks[block_id]
            assert evicted.block_hash is not None
            del self._cached[evicted.block_hash]
            evicted.block_hash = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released twice"
        if block.ref_count == 0:
            if block.block_hash is None:
                self._free_uncached.append(block_id)
            else:
                self._free_cached[block_id] = None
