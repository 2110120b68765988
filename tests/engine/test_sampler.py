"""Sampler tests on fixed logits: masks, penalties, seeds, logprobs, non-finite input."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from app.engine.cdf_draw import inverse_cdf
from app.engine.sampler import Sampler, apply_penalties
from app.engine.sequence import SamplingParams, Sequence
from app.engine.truncation import (
    TOP_P_CANDIDATES,
    mask_min_p,
    mask_top_k,
    mask_top_k_top_p,
    nucleus_limit,
)

EOS = 0
CPU = torch.device("cpu")


def make_seq(
    prompt: list[int] | None = None, output: list[int] | None = None, **params: object
) -> Sequence:
    seq = Sequence(0, "r", 0, prompt or [1], SamplingParams(**params))  # type: ignore[arg-type]
    seq.token_ids += output or []
    return seq


# Draws by inverting the distribution (the CPU's way) and by the exponential race (a GPU's)
RACE_OR_CDF = pytest.mark.parametrize("race", [False, True], ids=["cdf", "race"])


def sampler_drawing(race: bool, seed: int = 0, **kwargs: Any) -> Sampler:
    sampler = Sampler(CPU, (EOS,), seed=seed, **kwargs)
    sampler.draws_by_race = race
    return sampler


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


def probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def test_top_k_keeps_the_k_largest_and_their_ties() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    mask_top_k(logits, [2, 5])
    assert kept(logits) == [[1, 2, 3], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize(
    ("top_p", "expected"), [(0.45, [0]), (0.65, [0, 1]), (0.75, [0, 1, 2]), (1.0, [0, 1, 2, 3, 4])]
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, expected: list[int]) -> None:
    logits = probs_logits([0.5, 0.2, 0.15, 0.1, 0.05])
    mask_top_k_top_p(logits, [5], [top_p])
    assert kept(logits) == [expected]


def test_top_p_applies_to_the_top_k_renormalised_distribution() -> None:
    logits = probs_logits([0.15, 0.5, 0.05, 0.2, 0.1])
    # After top_k=3: {1: .588, 3: .235, 0: .176}; mass before token 0 is .824 >= .8.
    mask_top_k_top_p(logits, [3], [0.8])
    assert kept(logits) == [[1, 3]]


def _top_p_by_full_sort(logits: torch.Tensor, top_p: list[float]) -> list[list[int]]:
    """The definition: sort every token, keep those with less than the nucleus limit (top_p
    less the boundary margin) of the mass before them."""
    sorted_probs, order = logits.softmax(dim=-1).double().sort(dim=-1, descending=True)
    limits = torch.tensor([nucleus_limit(p) for p in top_p], dtype=torch.float64).unsqueeze(1)
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < limits
    keep[:, 0] = True
    rows = zip(order, keep, strict=True)
    return [sorted(row_order[row_keep].tolist()) for row_order, row_keep in rows]


def test_top_p_over_a_large_vocabulary_matches_a_full_sort() -> None:
    """Peaked rows find their cut among the first candidates, flat ones need every token."""
    vocab = 8 * TOP_P_CANDIDATES
    generator = torch.Generator().manual_seed(11)
    scales = torch.tensor([[8.0], [0.1], [3.0], [0.01]])  # peaked, flat, between, flatter
    logits = torch.randn(4, vocab, generator=generator) * scales
    top_p = [0.9, 0.9, 0.99, 0.5]
    expected = _top_p_by_full_sort(logits, top_p)
    assert len(expected[0]) < TOP_P_CANDIDATES < len(expected[1])  # both paths are taken
    mask_top_k_top_p(logits, [vocab] * 4, top_p)
    assert kept(logits) == expected


@pytest.mark.parametrize("vocab", [5, 4 * TOP_P_CANDIDATES])  # the cut among candidates, or not
def test_top_p_keeps_every_token_as_likely_as_the_last_one_in(vocab: int) -> None:
    """A sort orders ties arbitrarily: the nucleus keeps all of a tie or none of it."""
    logits = torch.full((1, vocab), -30.0)  # the rest: about 1e-13 each
    logits[0, :5] = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0])
    # probabilities about .69, .09, .09, .09, .03, ...: the first four hold .87 >= .8, the
    # first two .78, so the nucleus ends inside the tie of tokens 1, 2 and 3
    mask_top_k_top_p(logits, [vocab], [0.8])
    assert kept(logits) == [[0, 1, 2, 3]]
    flat = torch.zeros(1, vocab)  # every token ties: all of them stay
    mask_top_k_top_p(flat, [vocab], [0.5])
    assert kept(flat) == [list(range(vocab))]


def test_min_p_keeps_tokens_above_a_fraction_of_the_largest() -> None:
    logits = probs_logits([0.5, 0.2, 0.15, 0.1, 0.05])
    mask_min_p(logits, [0.25])  # threshold 0.125
    assert kept(logits) == [[0, 1, 2]]


@RACE_OR_CDF
def test_sampling_only_draws_tokens_the_masks_keep(race: bool) -> None:
    sampler = sampler_drawing(race, seed=0)
    logits = probs_logits([0.3, 0.25, 0.2, 0.15, 0.1]).repeat(3, 1)
    seqs = [make_seq(top_k=2), make_seq(top_p=0.5), make_seq(min_p=0.6)]
    seen: list[set[int]] = [set(), set(), set()]
    for _ in range(200):
        for row, token in enumerate(sampler.sample(logits.clone(), seqs).token_ids):
            seen[row].add(token)
    assert seen == [{0, 1}, {0, 1}, {0, 1, 2}]


@RACE_OR_CDF
def test_draws_follow_the_distribution(race: bool) -> None:
    sampler = sampler_drawing(race, seed=1)
    target = [0.5, 0.3, 0.15, 0.05]
    logits = probs_logits(target).repeat(4000, 1)
    seqs = [make_seq()] * 4000
    tokens = torch.tensor(sampler.sample(logits, seqs).token_ids)
    freqs = torch.bincount(tokens, minlength=4).float() / 4000
    assert torch.allclose(freqs, torch.tensor(target), atol=0.03)


def test_inverse_cdf_never_draws_a_masked_token() -> None:
    inf = float("inf")
    logits = torch.tensor([[-inf, 0.0, -inf, 1.0, -inf]] * 3)
    largest_below_one = 1.0 - 2.0**-53
    draws = inverse_cdf(logits, torch.tensor([0.0, largest_below_one, 0.3], dtype=torch.float64))
    # 0.3 of the weight (1 + e) falls on token 1, whose share is 1 / (1 + e) = 0.27
    assert draws.tolist() == [1, 3, 3]


def test_draws_over_a_large_vocabulary_follow_the_distribution() -> None:
    """Draws land in the long tail of a real vocabulary's size as often as its share says."""
    vocab = 50257
    logits = torch.full((1, vocab), -8.0)
    logits[0, 0] = 0.0  # exp(-8) * 50256 = 16.9 against 1: the tail holds 94%
    tail_share = 1 - 1 / (1 + (vocab - 1) * math.exp(-8.0))
    uniforms = (torch.arange(400, dtype=torch.float64) + 0.5) / 400  # evenly spread
    draws = inverse_cdf(logits.repeat(400, 1), uniforms)
    assert (draws != 0).double().mean().item() == pytest.approx(tail_share, abs=1 / 400)


@RACE_OR_CDF
def test_temperature_sharpens_the_distribution(race: bool) -> None:
    sampler = sampler_drawing(race, seed=2)
    logits = probs_logits([0.6, 0.4]).repeat(2000, 1)
    cold = torch.tensor(
        sampler.sample(logits.clone(), [make_seq(temperature=0.25)] * 2000).token_ids
    )
    # p0 at T=0.25 is .6^4 / (.6^4 + .4^4) = .835
    assert abs((cold == 0).float().mean().item() - 0.835) < 0.03


def test_greedy_rows_take_the_argmax() -> None:
    sampler = Sampler(CPU, (EOS,))
    logits = torch.tensor([[0.1, 2.0, 1.9], [3.0, 0.0, 2.9]])
    out = sampler.sample(logits, [make_seq(temperature=0.0), make_seq(temperature=0.0)])
    assert out.token_ids == [1, 0]


def test_penalties_match_their_definitions() -> None:
    torch.manual_seed(0)
    vocab = 12
    raw = torch.randn(2, vocab)
    prompt, output = [1, 2, 5], [2, 3, 3, 7]
    seq = make_seq(prompt, output, temperature=0.0, logprobs=vocab, repetition_penalty=1.5,
                   frequency_penalty=0.3, presence_penalty=0.7)  # fmt: skip
    plain = make_seq(prompt, output, temperature=0.0, logprobs=vocab)
    expected = raw[0].clone()
    for token in set(prompt) | set(output):
        value = expected[token]
        expected[token] = value / 1.5 if value > 0 else value * 1.5
    for token in set(output):
        expected[token] -= 0.3 * output.count(token) + 0.7
    out = Sampler(CPU, (EOS,)).sample(raw.clone(), [seq, plain])
    assert out.token_ids[0] == int(expected.argmax())
    got = dict(zip(out.logprobs[0].top_token_ids, out.logprobs[0].top_logprobs, strict=True))  # type: ignore[union-attr]
    want = torch.log_softmax(expected, dim=-1)
    assert all(math.isclose(got[t], want[t].item(), abs_tol=1e-5) for t in range(vocab))
    unpenalised = torch.log_softmax(raw[1], dim=-1)
    assert out.logprobs[1].token_logprob == pytest.approx(unpenalised.max().item(), abs=1e-5)  # type: ignore[union-attr]


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
    apply_penalties(logits, [seqs[0], seqs[2]], [0, 2])
    torch.testing.assert_close(logits[0], _penalised_by_definition(raw[0], seqs[0]))
    assert torch.equal(logits[1], raw[1])
    torch.testing.assert_close(logits[2], _penalised_by_definition(raw[2], seqs[2]))


def test_min_tokens_masks_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, 1.0]] * 3)
    seqs = [
        make_seq(temperature=0.0, min_tokens=2, stop_token_ids=[1]),
        make_seq(output=[3, 3], temperature=0.0, min_tokens=2),
        make_seq(temperature=0.0, min_tokens=2, ignore_eos=True),
    ]
    assert Sampler(CPU, (EOS,)).sample(logits, seqs).token_ids == [3, 0, 0]


def test_logit_bias_is_added_to_its_own_rows_tokens() -> None:
    logits = torch.tensor([[0.1, 2.0, 1.9, 0.0]] * 3)
    seqs = [
        make_seq(temperature=0.0),  # no bias: the argmax of its raw logits
        make_seq(temperature=0.0, logit_bias={2: 0.2}),  # 1.9 + 0.2 passes 2.0
        make_seq(temperature=0.0, logit_bias={1: -100.0, 2: -100.0}),
    ]
    assert Sampler(CPU, (EOS,)).sample(logits, seqs).token_ids == [1, 2, 0]
    alone = [make_seq(temperature=0.0, logit_bias={2: 0.2})]  # the fast path must not skip it
    assert Sampler(CPU, (EOS,)).sample(logits[:1].clone(), alone).token_ids == [2]


@RACE_OR_CDF
def test_a_large_logit_bias_forces_a_sampled_token(race: bool) -> None:
    sampler = sampler_drawing(race, seed=4)
    logits = probs_logits([0.7, 0.2, 0.09, 0.01]).repeat(2, 1)
    seqs = [make_seq(logit_bias={3: 100.0}), make_seq(top_p=0.5, logit_bias={0: -100.0})]
    for _ in range(50):
        assert sampler.sample(logits.clone(), seqs).token_ids == [3, 1]


def test_logprobs_include_the_logit_bias() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    seq = make_seq(temperature=0.0, logprobs=2, logit_bias={3: 4.0})
    row = Sampler(CPU, (EOS,)).sample(logits.clone(), [seq]).logprobs[0]
    expected = torch.log_softmax(logits[0] + torch.tensor([0.0, 0.0, 0.0, 4.0]), dim=-1)
    assert row is not None and row.top_token_ids == [3, 0]
    assert row.top_logprobs == pytest.approx(expected[[3, 0]].tolist(), abs=1e-6)


def test_logit_bias_neither_unbans_nor_ends_early() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.5]] * 2)
    seqs = [
        make_seq(temperature=0.0, logit_bias={2: 100.0}),  # 2 is banned: bias cannot lift it
        make_seq(temperature=0.0, min_tokens=1, logit_bias={EOS: 100.0}),
    ]
    sampler = Sampler(CPU, (EOS,), banned_token_ids=(2,))
    assert sampler.sample(logits, seqs).token_ids == [1, 1]


@RACE_OR_CDF
def test_seeded_rows_give_the_same_tokens_alone_and_in_a_batch(race: bool) -> None:
    torch.manual_seed(3)
    steps = [torch.randn(9, 50) for _ in range(6)]

    def run(batch_rows: list[int], target_row: int) -> list[int]:
        sampler = sampler_drawing(race, seed=123)
        seqs = {
            r: make_seq(temperature=0.9, top_p=0.95, seed=(7 if r == target_row else None))
            for r in batch_rows
        }
        tokens = []
        for logits in steps:
            out = sampler.sample(logits[batch_rows].clone(), [seqs[r] for r in batch_rows])
            tokens.append(out.token_ids[batch_rows.index(target_row)])
        return tokens

    alone = run([4], 4)
    assert run(list(range(9)), 4) == alone
    assert run([8, 4, 0], 4) == alone


def test_samples_of_one_request_get_distinct_seeds() -> None:
    sampler = Sampler(CPU, (EOS,))
    first, second = make_seq(seed=5), make_seq(seed=5)
    second.index = 1
    logits = torch.zeros(2, 1000)
    a, b = sampler.sample(logits, [first, second]).token_ids
    assert a != b


def test_logprobs_report_the_sampled_token_and_top_alternatives() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    out = Sampler(CPU, (EOS,)).sample(
        logits.clone(), [make_seq(temperature=0.5, logprobs=2, seed=1)]
    )
    row = out.logprobs[0]
    assert row is not None
    expected = torch.log_softmax(logits[0] / 0.5, dim=-1)
    assert row.top_token_ids == [0, 1]
    assert row.top_logprobs == pytest.approx(expected[:2].tolist(), abs=1e-6)
    assert row.token_logprob == pytest.approx(expected[out.token_ids[0]].item(), abs=1e-6)


def test_logprobs_are_taken_before_truncation() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    out = Sampler(CPU, (EOS,)).sample(logits.clone(), [make_seq(top_k=1, logprobs=3, seed=1)])
    row = out.logprobs[0]
    assert row is not None and out.token_ids == [0]
    expected = torch.log_softmax(logits[0], dim=-1)
    assert row.top_logprobs == pytest.approx(expected[:3].tolist(), abs=1e-6)


def test_non_finite_logits_do_not_crash_and_are_reported() -> None:
    logits = torch.tensor(
        [[1.0, float("nan"), 3.0], [float("nan")] * 3, [float("inf"), 0.0, 1.0], [0.0, 2.0, 1.0]]
    )
    seqs = [
        make_seq(top_p=0.9, seed=1),
        make_seq(),
        make_seq(temperature=0.0),
        make_seq(temperature=0.0),
    ]
    out = Sampler(CPU, (EOS,)).sample(logits, seqs)
    assert out.nonfinite_rows == [1]
    assert out.token_ids[0] in (0, 2) and out.token_ids[2] == 0 and out.token_ids[3] == 1


@RACE_OR_CDF
def test_banned_tokens_are_never_sampled(race: bool) -> None:
    sampler = sampler_drawing(race, banned_token_ids=(2,))
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.5]] * 3)
    seqs = [make_seq(temperature=0.0), make_seq(seed=3), make_seq(temperature=0.0, logprobs=1)]
    for _ in range(20):
        assert 2 not in sampler.sample(logits.clone(), seqs).token_ids


def test_greedy_rows_with_non_finite_logits_take_the_careful_path() -> None:
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[nan, 1.0, 2.0], [0.0, 3.0, -inf], [nan, nan, nan], [-inf, inf, 0.0]])
    seqs = [make_seq(temperature=0.0) for _ in range(4)]
    out = Sampler(CPU, (EOS,)).sample(logits, seqs)
    assert out.token_ids[:2] == [2, 1] and out.token_ids[3] == 1
    assert out.nonfinite_rows == [2]
