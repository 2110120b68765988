"""Scheduler unit tests: plain lists, no torch, a fake model that maps tokens to a next token."""

from __future__ import annotations

import subprocess
import sys

from app.engine.block_manager import BlockManager
from app.engine.scheduler import ScheduledBatch, Scheduler
from app.engine.sequence import SamplingParams, Sequence, SequenceStatus

BLOCK = 4


def next_token(tokens: list[int]) -> int:
    """A deterministic stand-in for a model: the next token depends on the whole context."""
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 31 + len(tokens)) % 97


def make_scheduler(num_blocks: int, max_seqs: int = 16, max_tokens: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK), max_seqs, max_tokens)


def make_seq(seq_id: int, prompt_len: int, max_tokens: int = 8, n: int = 1) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, n=n)
    prompt = [(seq_id * 7 + i) % 50 for i in range(prompt_len)]
    seq = Sequence(seq_id, f"r{seq_id}", 0, prompt, params)
    seq.pending_forks = [
        Sequence(seq_id * 100 + i, f"r{seq_id}", i, prompt, params) for i in range(1, n)
    ]
    return seq


def run_step(scheduler: Scheduler) -> ScheduledBatch:
    """Schedule, 'compute' and update, finishing sequences that reach max_tokens."""
    batch = scheduler.schedule()
    sampled: list[list[int]] = []
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
        done = seq.num_computed_tokens + num_new == seq.num_tokens
        samples = seq.group_size if done else 0
        sampled.append([next_token(seq.token_ids) + k for k in range(samples)])
    for seq in scheduler.update(batch, sampled):
        if seq.num_output_tokens >= seq.params.max_tokens:
            scheduler.finish(seq, "length")
    return batch


def run_to_completion(scheduler: Scheduler, max_steps: int = 1000) -> int:
    for step in range(max_steps):
        if not scheduler.has_unfinished:
            return step
        run_step(scheduler)
    raise AssertionError("did not finish")


def test_admits_and_runs_to_completion_returning_all_blocks() -> None:
    scheduler = make_scheduler(num_blocks=32)
    seqs = [make_seq(i, prompt_len=5 + i) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    first = scheduler.schedule()
    assert first.seqs == seqs and first.num_new_tokens == [5, 6, 7, 8]
    scheduler.update(first, [[1]] * 4)
    run_to_completion(scheduler)
    assert all(s.status is SequenceStatus.FINISHED and s.num_output_tokens == 8 for s in seqs)
    assert scheduler.block_manager.num_free_blocks == 32


def test_decodes_go_first_and_long_prompts_are_chunked() -> None:
    scheduler = make_scheduler(num_blocks=32, max_tokens=8)
    short = make_seq(0, prompt_len=3)
    scheduler.add(short)
    assert run_step(scheduler).num_new_tokens == [3]
    long = make_seq(1, prompt_len=20)
    scheduler.add(long)
    chunks = []
    for _ in range(3):
        batch = run_step(scheduler)
        assert batch.seqs[0] is short and batch.num_new_tokens[0] == 1  # never frozen
        chunks.append(batch.num_new_tokens[1])
        assert batch.num_batched_tokens <= 8
    assert chunks == [7, 7, 6]
    assert long.num_output_tokens == 1 and long.is_decoding


def test_sequence_cap_counts_unforked_samples() -> None:
    scheduler = make_scheduler(num_blocks=64, max_seqs=4)
    group = make_seq(0, prompt_len=4, n=3)
    single, blocked = make_seq(1, prompt_len=4), make_seq(2, prompt_len=4)
    for seq in (group, single, blocked):
        scheduler.add(seq)
    batch = run_step(scheduler)
    assert batch.seqs == [group, single]
    assert len(scheduler.running) == 4  # the group forked into three samples
    assert list(scheduler.waiting) == [blocked]


def test_forked_samples_share_the_prompt_blocks() -> None:
    scheduler = make_scheduler(num_blocks=16)
    parent = make_seq(0, prompt_len=6, n=3)
    scheduler.add(parent)
    run_step(scheduler)
    children = [s for s in scheduler.running if s is not parent]
    assert [c.index for c in children] == [1, 2]
    first_tokens = [s.output_token_ids for s in (parent, *children)]
    assert len({tuple(t) for t in first_tokens}) == 3  # each sample got its own token
    manager = scheduler.block_manager
    assert all(c.block_table == parent.block_table for c in children)
    assert manager.blocks[parent.block_table[0]].ref_count == 3
    batch = run_step(scheduler)
    assert len(batch.block_copies) == 2  # the shared partial block is copied for two of three
    run_to_completion(scheduler)
    assert manager.num_free_blocks == 16


def test_preemption_frees_the_newest_and_resumes_with_identical_tokens() -> None:
    def outputs(num_blocks: int) -> tuple[list[list[int]], int]:
        scheduler = make_scheduler(num_blocks=num_blocks)
        seqs = [make_seq(i, prompt_len=6, max_tokens=12) for i in range(4)]
        for seq in seqs:
            scheduler.add(seq)
        run_to_completion(scheduler)
        assert scheduler.block_manager.num_free_blocks == num_blocks
        return [s.output_token_ids for s in seqs], scheduler.num_preemptions

    reference, no_preemptions = outputs(num_blocks=64)
    constrained, preemptions = outputs(num_blocks=6)
    assert no_preemptions == 0 and preemptions > 0
    assert constrained == reference


def test_the_newest_sequence_is_the_one_preempted() -> None:
    scheduler = make_scheduler(num_blocks=4)
    old, new = make_seq(0, prompt_len=4), make_seq(1, prompt_len=4)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # one block each, both full
    run_step(scheduler)  # each takes a second block: the pool is empty
    assert scheduler.block_manager.num_free_blocks == 0
    for _ in range(4):
        run_step(scheduler)
        if scheduler.num_preemptions:
            break
    assert new.status is SequenceStatus.WAITING and scheduler.waiting[0] is new
    assert old.status is SequenceStatus.RUNNING
    assert new.block_table == [] and new.num_computed_tokens == 0


def test_finish_returns_blocks_from_running_and_waiting_sequences() -> None:
    scheduler = make_scheduler(num_blocks=8)
    seqs = [make_seq(i, prompt_len=9, max_tokens=50) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(3):
        run_step(scheduler)
    assert scheduler.running and scheduler.waiting
    for seq in seqs:
        scheduler.finish(seq, "abort")
    assert not scheduler.has_unfinished
    assert scheduler.block_manager.num_free_blocks == 8
    assert all(s.finish_reason == "abort" for s in seqs)


def test_no_starvation_under_a_stream_of_short_requests() -> None:
    scheduler = make_scheduler(num_blocks=12, max_seqs=8)
    next_id = 0

    def add_short() -> None:
        nonlocal next_id
        next_id += 1
        scheduler.add(make_seq(next_id, prompt_len=3, max_tokens=4))

    for _ in range(4):
        add_short()
    run_step(scheduler)
    long = make_seq(10_000, prompt_len=30, max_tokens=4)  # needs 9 of the 12 blocks
    scheduler.add(long)
    for _ in range(50):
        add_short()
        run_step(scheduler)
        if long.status is not SequenceStatus.WAITING:
            break
    assert long.status is not SequenceStatus.WAITING, "the long request starved"


def test_scheduler_and_block_manager_import_no_torch() -> None:
    code = (
        "import sys, app.engine.scheduler, app.engine.block_manager; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_preempting_forked_samples_gives_the_unconstrained_tokens() -> None:
    def outputs(num_blocks: int) -> tuple[list[list[int]], int]:
        scheduler = make_scheduler(num_blocks=num_blocks)
        groups = [make_seq(i, prompt_len=6, max_tokens=10, n=3) for i in range(3)]
        samples = [s for g in groups for s in (g, *g.pending_forks)]
        for group in groups:
            scheduler.add(group)
        run_to_completion(scheduler)
        assert scheduler.block_manager.num_free_blocks == num_blocks
        return [s.output_token_ids for s in samples], scheduler.num_preemptions

    reference, _ = outputs(num_blocks=64)
    constrained, preemptions = outputs(num_blocks=8)
    assert preemptions > 0
    assert constrained == reference
