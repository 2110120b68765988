"""The logit processors on their own, each on a batch where only some rows ask for it."""

from __future__ import annotations

import numpy as np
import torch

from app.engine.sampling.processors import apply_grammar_masks, apply_penalties
from app.engine.sequence import Sequence
from tests.engine.sampling.rows import make_seq


def _penalised_by_definition(raw: torch.Tensor, seq: Sequence) -> torch.Tensor:
    expected = raw.clone()
    output = seq.output_token_ids
    for token in set(seq.token_ids):
        value = expected[token]
        rep = seq.params.repetition_penalty
        expected[token] = value / rep if value > 0 else value * rep
    for token in set(output):
        expected[token] -= seq.params.frequency_penalty * output.count(token)
        expected[token] -= seq.params.presence_penalty
    return expected


def test_penalties_of_rows_with_different_histories() -> None:
    """Rows that have seen different numbers of tokens, one without penalties between them."""
    torch.manual_seed(1)
    raw = torch.randn(3, 40)
    seqs = [
        make_seq([4, 9], [9, 9, 30, 4], repetition_penalty=1.3, frequency_penalty=0.2),
        make_seq([1, 2, 3], [5]),
        make_seq(list(range(10, 25)), [0, 39, 39], repetition_penalty=0.8, presence_penalty=1.0),
    ]
    logits = raw.clone()
    apply_penalties(logits, seqs)
    torch.testing.assert_close(logits[0], _penalised_by_definition(raw[0], seqs[0]))
    assert torch.equal(logits[1], raw[1])
    torch.testing.assert_close(logits[2], _penalised_by_definition(raw[2], seqs[2]))


class FixedMatcher:
    """Allows the same tokens at every step, as llguidance's bitmask says it: one bit per
    token, least significant first."""

    def __init__(self, allowed: list[int], vocab: int) -> None:
        bits = np.zeros(vocab, dtype=np.uint8)
        bits[allowed] = 1
        self.bitmask = np.packbits(bits, bitorder="little").tobytes()

    def compute_bitmask(self) -> bytes:
        return self.bitmask


def test_grammar_masks_keep_only_the_allowed_tokens_of_constrained_rows() -> None:
    vocab = 21  # not a whole number of bytes
    raw = torch.randn(3, vocab, generator=torch.Generator().manual_seed(2))
    seqs = [make_seq(), make_seq(), make_seq()]
    seqs[0].matcher = FixedMatcher([0, 7, 20], vocab)
    seqs[2].matcher = FixedMatcher([8, 9], vocab)
    logits = raw.clone()
    apply_grammar_masks(logits, seqs)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 7, 20]
    assert torch.equal(logits[1], raw[1])  # no grammar: untouched
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [8, 9]
    assert torch.equal(logits[2, [8, 9]], raw[2, [8, 9]])
