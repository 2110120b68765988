"""Who runs in the next step, and with how many tokens. No torch.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`). Decodes go first (one token each), then prompts that are
part-way through their prefill, then newly admitted prompts, each prefill cut
to what is left of the budget (chunked prefill), so a long prompt never
freezes the running streams.

A waiting sequence is admitted only when blocks for all its tokens fit.
Waiting sequences are admitted strictly in order, so a request that needs
many blocks is not overtaken forever by a stream of small ones. When a decode
needs a block and none is free, the newest running sequence is preempted:
its blocks are freed and it goes back to the head of the waiting queue, to be
recomputed later from its tokens (which gives the same results).

For a model whose image tokens attend to each other both ways (Gemma 3), a prefill
chunk never ends inside an image: it stops before an image it cannot finish, or, when
it starts inside or at one, takes the rest of it even past the budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from app.engine.block_manager import BlockManager
from app.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """What the runner computes in one step.

    Sequence i computes `num_new_tokens[i]` tokens starting at its
    `num_computed_tokens`. Block copies must be done before the forward pass.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst)
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        image_spans_in_one_chunk: bool = False,
    ) -> None:
        self.block_manager = block_manager
        self.image_spans_in_one_chunk = image_spans_in_one_chunk
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # cumulative

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    # ---- schedule ------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        decodes = [s for s in self.running if s.is_decoding]
        budget = self._schedule_decodes(decodes, batch, budget)
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in prefills:
            if budget == 0:
                break
            budget = self._add(batch, seq, self._chunk(seq, budget), budget)
        if batch.num_preempted == 0:
            self._admit(batch, budget)
        return batch

    def _schedule_decodes(self, decodes: list[Sequence], batch: ScheduledBatch, budget: int) -> int:
        for seq in decodes:
            if budget == 0 or seq.status is not SequenceStatus.RUNNING:
                continue  # over budget, or preempted for an older decode this step
            while not self.block_manager.can_append(seq):
                victim = self._newest_running(exclude=seq)
                budget += self._preempt(victim or seq, batch)
                if victim is None:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            copy = self.block_manager.append_slot(seq)
            if copy is not None:
                batch.block_copies.append(copy)
            budget = self._add(batch, seq, 1, budget)
        return budget

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        num_running = sum(seq.group_size for seq in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if num_running + seq.group_size > self.max_num_seqs:
                break
            if not self.block_manager.try_allocate(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_running += seq.group_size
            budget = self._add(batch, seq, self._chunk(seq, budget), budget)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """How many of the sequence's prompt tokens to compute now."""
        count = min(seq.num_uncomputed_tokens, budget)
        if not self.image_spans_in_one_chunk:
            return count
        start = seq.num_computed_tokens
        for span in seq.image_spans:
            if span.start < start + count < span.end:  # the chunk would end inside it
                return span.start - start if span.start > start else span.end - start
        return count

    @staticmethod
    def _add(batch: ScheduledBatch, seq: Sequence, num_tokens: int, budget: int) -> int:
        batch.seqs.append(seq)
        batch.num_new_tokens.append(num_tokens)
        return max(0, budget - num_tokens)  # an image kept whole may pass the budget

    def _newest_running(self, exclude: Sequence) -> Sequence | None:
        candidates = [s for s in self.running if s is not exclude]
        return max(candidates, key=lambda s: s.seq_id) if candidates else None

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> int:
        """Free the sequence's blocks and queue it first for recomputation.

        Returns the tokens it had been given in this batch, now back in the budget.
        """
        refund = 0
        if seq in batch.seqs:
            i = batch.seqs.index(seq)
            refund = batch.num_new_tokens[i]
            del batch.seqs[i], batch.num_new_tokens[i]
            owned = set(seq.block_table)
            batch.block_copies = [c for c in batch.block_copies if c[1] not in owned]
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.num_preempted += 1
        self.num_preemptions += 1
        return refund

    # ---- update --------------------------------------------------------------
    def update(self, batch: ScheduledBatch, sampled: list[list[int]]) -> list[Sequence]:
        """Record a finished step: tokens computed, and sampled tokens appended.

        `sampled[i]` holds the tokens sampled for `batch.seqs[i]`: empty while its
        prompt is still being prefilled, one token, or one per sample when its
        prompt completes with pending forks (the first is its own). Returns the
        sequences that received a token, forked samples included.
        """
        with_new_token: list[Sequence] = []
        cache_blocks = self.block_manager.cache_computed_blocks
        for seq, num_new, tokens in zip(batch.seqs, batch.num_new_tokens, sampled, strict=True):
            seq.num_computed_tokens += num_new
            cache_blocks(seq)
            if not tokens:
                continue
            if seq.pending_forks:
                with_new_token.extend(self._fork(seq, tokens[1:]))
            seq.append_token(tokens[0])
            with_new_token.append(seq)
        return with_new_token

    def _fork(self, parent: Sequence, tokens: list[int]) -> list[Sequence]:
        children, parent.pending_forks = parent.pending_forks, []
        for child, token in zip(children, tokens, strict=True):
            child.token_ids = [*parent.token_ids[: parent.num_prompt_tokens], token]
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.prompt_logprobs = parent.prompt_logprobs  # complete: the prompt is done
            child.was_admitted = True
            self.block_manager.fork(parent, child)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        return children

    # ---- finish --------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (and any samples not yet forked from it); frees its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        for child in seq.pending_forks:
            child.status = SequenceStatus.FINISHED
            child.finish_reason = reason
