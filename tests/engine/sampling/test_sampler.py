"""The sampler's pipeline on fixed logits: truncation, penalties, bias, seeds, logprobs,
non-finite input, by both draws."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from app.engine.sampling import Sampler
from tests.engine.sampling.rows import CPU, EOS, make_seq, probs_logits

# Draws by inverting the distribution (the CPU's way) and by the exponential race (a GPU's)
RACE_OR_CDF = pytest.mark.parametrize("race", [False, True], ids=["cdf", "race"])


def sampler_drawing(race: bool, seed: int = 0, **kwargs: Any) -> Sampler:
    sampler = Sampler(CPU, (EOS,), seed=seed, **kwargs)
    sampler.draws_by_race = race
    return sampler


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
