"""Block manager unit tests: plain lists, no torch."""

from __future__ import annotations

import pytest

from app.engine.block_manager import BlockManager
from app.engine.sequence import ImageInput, ImageSpan, SamplingParams, Sequence

BLOCK = 4


def make_seq(tokens: list[int], seq_id: int = 0, spans: tuple[ImageSpan, ...] = ()) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, tokens, SamplingParams(), spans)


def computed(manager: BlockManager, seq: Sequence) -> None:
    """Pretend a step computed every token of the sequence."""
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_computed_blocks(seq)


def test_allocate_and_free_return_the_pool_to_full() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    seq = make_seq(list(range(10)))
    assert manager.try_allocate(seq)
    assert len(seq.block_table) == 3
    assert manager.num_free_blocks == 5
    assert manager.usage == pytest.approx(3 / 8)
    manager.free(seq)
    assert manager.num_free_blocks == 8
    assert seq.block_table == []


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    manager = BlockManager(num_blocks=2, block_size=BLOCK)
    seq = make_seq(list(range(9)))  # needs 3 blocks
    assert not manager.try_allocate(seq)
    assert manager.num_free_blocks == 2
    assert seq.block_table == []


def test_prefix_blocks_are_shared_and_ref_counted() -> None:
    manager = BlockManager(num_blocks=10, block_size=BLOCK)
    first = make_seq(list(range(10)), 0)
    assert manager.try_allocate(first)
    computed(manager, first)
    second = make_seq([0, 1, 2, 3, 4, 5, 6, 7, 99, 98, 97], 1)
    assert manager.try_allocate(second)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert second.num_computed_tokens == 8
    assert second.num_cached_tokens == 8
    assert [manager.blocks[b].ref_count for b in second.block_table] == [2, 2, 1]
    assert manager.prefix_cache_queries == 10 + 11
    assert manager.prefix_cache_hits == 8


def test_last_token_is_never_served_from_the_cache() -> None:
    manager = BlockManager(num_blocks=10, block_size=BLOCK)
    first = make_seq(list(range(8)), 0)
    assert manager.try_allocate(first)
    computed(manager, first)
    same = make_seq(list(range(8)), 1)
    assert manager.try_allocate(same)
    # Both blocks are cached, but the last token must be recomputed: only one block is reused.
    assert same.num_computed_tokens == 4
    assert same.block_table[0] == first.block_table[0]
    assert same.block_table[1] != first.block_table[1]


def test_freed_cached_blocks_stay_reusable_until_evicted_lru() -> None:
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    a, b = make_seq([1] * 5, 0), make_seq([2] * 5, 1)
    for seq in (a, b):
        assert manager.try_allocate(seq)
        computed(manager, seq)
    a_block, b_block = a.block_table[0], b.block_table[0]
    manager.free(a)  # a's full block is now free-but-cached, older than b's
    manager.free(b)
    assert manager.num_free_blocks == 4
    # Needs all 4 blocks: the two uncached ones first, then a's (least recently used).
    big = make_seq([3] * 13, 2)
    assert manager.try_allocate(big)
    assert a_block in big.block_table and b_block in big.block_table
    manager.free(big)
    again = make_seq([1] * 5, 3)
    assert manager.try_allocate(again)
    assert again.num_computed_tokens == 0  # a's block was evicted


def test_eviction_takes_the_least_recently_used_cached_block() -> None:
    manager = BlockManager(num_blocks=6, block_size=BLOCK)
    for k in range(3):  # each leaves one cached full block and one uncached partial block
        seq = make_seq([k] * 5, k)
        assert manager.try_allocate(seq)
        computed(manager, seq)
        manager.free(seq)
    small, large = make_seq([7] * 5, 7), make_seq([8] * 9, 8)
    assert manager.try_allocate(small)  # takes two uncached blocks
    assert manager.try_allocate(large)  # the last uncached one, then evicts the two LRU ones
    assert manager.num_free_blocks == 1
    manager.free(small)
    manager.free(large)
    hits = []
    for k in (2, 1, 0):
        probe = make_seq([k] * 5, 10 + k)
        before = manager.prefix_cache_hits
        if manager.try_allocate(probe):
            manager.free(probe)
        hits.append(manager.prefix_cache_hits - before)
    assert hits == [4, 0, 0]  # only the most recently cached prefix survived


def test_image_hashes_are_part_of_the_block_key() -> None:
    manager = BlockManager(num_blocks=10, block_size=BLOCK)
    tokens = [5, 7, 7, 7, 7, 1, 2, 3, 4]

    def with_image(content_hash: str, seq_id: int) -> Sequence:
        span = ImageSpan(start=1, length=4, image=ImageInput(None, content_hash))
        return make_seq(tokens, seq_id, (span,))

    first = with_image("cat", 0)
    assert manager.try_allocate(first)
    computed(manager, first)
    other_image = with_image("dog", 1)
    assert manager.try_allocate(other_image)
    assert other_image.num_computed_tokens == 0
    same_image = with_image("cat", 2)
    assert manager.try_allocate(same_image)
    assert same_image.num_computed_tokens == 8


def test_fork_shares_blocks_and_copies_the_partial_one_on_write() -> None:
    manager = BlockManager(num_blocks=10, block_size=BLOCK)
    parent = make_seq(list(range(6)), 0)
    child = make_seq(list(range(6)), 1)
    assert manager.try_allocate(parent)
    computed(manager, parent)
    manager.fork(parent, child)
    parent.append_token(100)
    child.append_token(200)
    assert [manager.blocks[b].ref_count for b in parent.block_table] == [2, 2]
    copy = manager.append_slot(parent)
    assert copy is not None and copy[0] == child.block_table[1]
    assert parent.block_table[1] == copy[1]
    assert manager.append_slot(child) is None  # the last holder writes in place
    assert [manager.blocks[b].ref_count for b in child.block_table] == [2, 1]
    manager.free(parent)
    manager.free(child)
    assert manager.num_free_blocks == 10


def test_append_slot_adds_a_block_at_the_boundary() -> None:
    manager = BlockManager(num_blocks=3, block_size=BLOCK)
    seq = make_seq(list(range(4)))
    assert manager.try_allocate(seq)
    computed(manager, seq)
    seq.append_token(9)
    assert manager.can_append(seq)
    assert manager.append_slot(seq) is None
    assert len(seq.block_table) == 2


def test_can_append_is_false_when_the_pool_is_empty() -> None:
    manager = BlockManager(num_blocks=1, block_size=BLOCK)
    seq = make_seq(list(range(4)))
    assert manager.try_allocate(seq)
    seq.append_token(9)
    assert not manager.can_append(seq)


def test_prefix_caching_can_be_disabled() -> None:
    manager = BlockManager(num_blocks=10, block_size=BLOCK, enable_prefix_caching=False)
    first = make_seq(list(range(10)), 0)
    assert manager.try_allocate(first)
    computed(manager, first)
    second = make_seq(list(range(10)), 1)
    assert manager.try_allocate(second)
    assert second.num_computed_tokens == 0
    assert manager.num_free_blocks == 4
