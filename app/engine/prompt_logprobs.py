"""Logprobs of prompt tokens: what completions' `echo` with `logprobs` reports, to score a text.

Each prompt token after the first gets the log-probability the model gave it after the
tokens before it, and the top alternatives there, from the raw logits (no penalty or
temperature applies to a prompt). Row p of a prefill predicts token p + 1, so a chunk of
positions [start, end) yields the logprobs of tokens start + 1 .. end, except that the
prompt's last row predicts the first output token, which the sampler handles.

A whole prompt's logits would be [P, vocab] (100 MB for 512 tokens of a 50k vocabulary),
so they are made a few rows at a time. A sequence recomputed after preemption skips the
positions it already has; until it has them all, the prefix cache is not used for it
(`Sequence.needs_prompt_logprobs`), since cached blocks hold K/V but no logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.engine.sampling import RowLogprobs
from app.engine.sampling.kernels import topk
from app.engine.sequence import Sequence

ROWS_PER_PASS = 64  # [64, 50257] float32 logits: 13 MB


@dataclass
class PromptRows:
    """The flat-batch rows whose logits score a prompt token, planned with the batch."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # the prompt token each row predicts
    owners: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, its rows)

    def add(self, seq: Sequence, start: int, num_new: int, first_row: int) -> None:
        """Positions [start, start + num_new) of `seq` sit at rows first_row, first_row + 1..."""
        if not seq.needs_prompt_logprobs:
            return
        first = max(start, len(seq.prompt_logprobs))
        end = min(start + num_new, seq.num_prompt_tokens - 1)
        if first >= end:
            return
        self.rows += range(first_row + first - start, first_row + end - start)
        self.targets += seq.token_ids[first + 1 : end + 1]
        self.owners.append((seq, end - first))


def score_prompt_rows(
    hidden: torch.Tensor,  # [T, hidden], the step's final hidden states
    plan: PromptRows,
    logits_of: Callable[[torch.Tensor], torch.Tensor],  # [n, hidden] -> [n, vocab] row-major
) -> dict[int, list[tuple[int, RowLogprobs]]]:
    """By seq_id: (prompt token, its logprob and top alternatives), in position order."""
    num_top = max(seq.params.prompt_logprobs or 0 for seq, _ in plan.owners)
    rows = torch.tensor(plan.rows, dtype=torch.int64, device=hidden.device)
    targets = torch.tensor(plan.targets, dtype=torch.int64, device=hidden.device)
    scored: list[RowLogprobs] = []
    for start in range(0, len(plan.rows), ROWS_PER_PASS):
        part = slice(start, start + ROWS_PER_PASS)
        logprobs = torch.log_softmax(logits_of(hidden.index_select(0, rows[part])), dim=-1)
        chosen = logprobs.gather(1, targets[part, None]).squeeze(1).tolist()  # [n]
        if num_top:
            top_values, top_ids = (t.tolist() for t in topk(logprobs, num_top))
        else:
            top_values = top_ids = [[] for _ in chosen]
        scored += map(RowLogprobs, chosen, top_ids, top_values)
    result: dict[int, list[tuple[int, RowLogprobs]]] = {}
    row = 0
    for seq, count in plan.owners:
        k = seq.params.prompt_logprobs or 0
        result[seq.seq_id] = [
            (
                token,
                RowLogprobs(entry.token_logprob, entry.top_token_ids[:k], entry.top_logprobs[:k]),
            )
            for token, entry in zip(
                plan.targets[row : row + count], scored[row : row + count], strict=True
            )
        ]
        row += count
    return result
