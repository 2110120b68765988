"""The CPU's draws with top_k, top_p and min_p against the same truncation built as masks.

Draws accept or refuse a token instead of masking the row first (`draw_cpu`); what they
draw must follow the masked distribution exactly, whether a row is accepted in a round
or falls back to masks after MAX_ROUNDS refusals. Every test runs with the real block
size and with blocks of 3 columns, so that these short rows span several blocks.
"""

from __future__ import annotations

import math

import pytest
import torch

from app.engine.sampling import draw_cpu
from app.engine.sampling.draw_cpu import BlockedCdf, draw_truncated, inverse_cdf
from app.engine.sampling.truncation import BOUNDARY_MARGIN, TOP_P_CANDIDATES, Truncation

DRAWS = 20_000
PROBS = [0.3, 0.22, 0.18, 0.12, 0.08, 0.05, 0.03, 0.02]  # decreasing: no ties


def uniforms_from(seed: int) -> draw_cpu.Uniforms:
    generator = torch.Generator().manual_seed(seed)
    return lambda rows: torch.rand(len(rows), dtype=torch.float64, generator=generator)


def masked_probs(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The reference: the row masked by `truncation` and renormalised."""
    masked = logits.clone()
    Truncation([top_k], [top_p], [min_p]).mask_logits(masked)
    return masked.softmax(dim=-1)[0]


def draw_counts(
    logits: torch.Tensor, top_k: int, top_p: float, min_p: float, draws: int = DRAWS
) -> torch.Tensor:
    rows = logits.repeat(draws, 1)
    truncation = Truncation([top_k] * draws, [top_p] * draws, [min_p] * draws)
    tokens = draw_truncated(rows, truncation, uniforms_from(0))
    return torch.bincount(tokens, minlength=logits.shape[1])


@pytest.fixture(autouse=True, params=[draw_cpu.SEARCH_BLOCK, 3], ids=["block", "block3"])
def block(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(draw_cpu, "SEARCH_BLOCK", request.param)
    return int(request.param)


@pytest.fixture(params=["accepted", "masked"])
def rounds(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Draw by accepting (the default rounds), or straight from the fallback's masks."""
    if request.param == "masked":
        monkeypatch.setattr(draw_cpu, "MAX_ROUNDS", 0)
    return str(request.param)


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"),
    [
        (8, 0.7, 0.0),  # the nucleus: 0.3 + 0.22 + 0.18 = 0.7 reaches it, so it ends there
        (8, 0.5, 0.0),  # 0.3 alone falls short: the second token is in
        (3, 1.0, 0.0),
        (8, 1.0, 0.4),  # at least 0.4 * 0.3 = 0.12: four tokens
        (5, 0.8, 0.3),  # top_k 5, then the nucleus of the renormalised five, then min_p
        (8, 0.9, 0.1),  # five tokens reach 0.9; min_p's 0.1 * 0.3 = 0.03 keeps all five
    ],
)
def test_draws_follow_the_masked_distribution(
    rounds: str, top_k: int, top_p: float, min_p: float
) -> None:
    logits = torch.tensor([PROBS]).log()
    expected = masked_probs(logits, top_k, top_p, min_p)
    counts = draw_counts(logits, top_k, top_p, min_p)
    assert counts[expected == 0].sum().item() == 0  # nothing outside the sets
    assert torch.allclose(counts / DRAWS, expected, atol=0.015)


def test_ties_with_the_last_token_kept_are_all_drawn(rounds: str) -> None:
    # top_k 2 meets a tie of tokens 1 and 2; top_p 0.5 ends inside the tie of 3, 4 and 5
    k_tie = torch.tensor([[4.0, 3.0, 3.0, 1.0]])
    assert set(draw_counts(k_tie, 2, 1.0, 0.0).nonzero().flatten().tolist()) == {0, 1, 2}
    p_tie = torch.tensor([[0.3, 0.1, 0.1, 0.15, 0.15, 0.15, 0.05]]).log()
    drawn = set(draw_counts(p_tie, 7, 0.5, 0.0).nonzero().flatten().tolist())
    assert drawn == {0, 3, 4, 5}


def test_draws_over_a_large_flat_vocabulary_stay_in_the_nucleus(rounds: str) -> None:
    """A nucleus wider than the mask path's candidates, as a random model's rows have."""
    vocab = 8 * TOP_P_CANDIDATES
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 0.5
    expected = masked_probs(logits, vocab, 0.5, 0.0)
    assert (expected > 0).sum().item() > TOP_P_CANDIDATES
    counts = draw_counts(logits, vocab, 0.5, 0.0, draws=4000)
    assert counts[expected == 0].sum().item() == 0
    # the share drawn from the nucleus's more likely half, as its probability says
    upper = expected >= expected[expected > 0].median()
    share = counts[upper].sum().item() / 4000
    assert share == pytest.approx(expected[upper].sum().item(), abs=0.03)


def test_rows_keep_their_own_parameters() -> None:
    logits = torch.tensor([PROBS]).log().repeat(3 * DRAWS, 1)
    top_k, top_p, min_p = [8, 2, 8], [0.5, 1.0, 1.0], [0.0, 0.0, 0.65]
    truncation = Truncation(top_k * DRAWS, top_p * DRAWS, min_p * DRAWS)
    tokens = draw_truncated(logits, truncation, uniforms_from(1)).view(DRAWS, 3)
    drawn = [set(tokens[:, row].tolist()) for row in range(3)]
    assert drawn == [{0, 1}, {0, 1}, {0, 1}]
    # min_p 0.65 keeps 0.3 and 0.22 (>= 0.195); top_k 2 the same pair; top_p 0.5 also
    shares = [(tokens[:, row] == 0).double().mean().item() for row in range(3)]
    assert shares == pytest.approx([0.3 / 0.52] * 3, abs=0.015)


def test_a_nucleus_that_reaches_top_p_exactly_ends_there(rounds: str) -> None:
    # powers of two, so that every weight and sum is exact: token 0 alone holds 0.5
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    assert draw_counts(logits, 4, 0.5, 0.0).nonzero().flatten().tolist() == [0]
    assert draw_counts(logits, 4, 0.75, 0.0).nonzero().flatten().tolist() == [0, 1]


@pytest.mark.parametrize("vocab", [1000, 1024, 7])
def test_blocked_search_finds_the_token_a_whole_row_running_sum_finds(
    block: int, vocab: int
) -> None:
    """Small whole weights: every sum is exact in float32, so the blocked search must land
    on the very token that a running sum over the whole row does, zeros and block edges
    included (1,024 is a whole number of blocks; 1,000 and 7 end in a shorter one)."""
    generator = torch.Generator().manual_seed(vocab)
    weights = torch.randint(0, 4, (64, vocab), generator=generator).float()
    weights[:, 0] = 0.0  # never drawn, nor any other zero
    weights[:, -1] = 1.0  # the last column is reachable
    weights[-1] = 0.0
    weights[-1, -1] = 1.0  # a row whose only weight is its last column
    uniforms = torch.rand(64, dtype=torch.float64, generator=generator)
    uniforms[:3] = torch.tensor([0.0, 1.0 - 2.0**-53, 0.5])
    running = weights.cumsum(dim=-1)
    target = (uniforms.float().unsqueeze(1) * running[:, -1:]).clamp_max(
        torch.nextafter(running[:, -1:], torch.zeros(1))
    )
    expected = torch.searchsorted(running, target, right=True).squeeze(1)
    drawn = BlockedCdf(weights).draw(None, uniforms)
    assert drawn.tolist() == expected.tolist()
    assert (weights[torch.arange(64), drawn] > 0).all()
    rows = [5, 63, 0]
    assert BlockedCdf(weights).draw(rows, uniforms[rows]).tolist() == expected[rows].tolist()


@pytest.mark.parametrize("vocab", [1000, 7])
def test_draws_that_end_exactly_on_a_block_edge(vocab: int) -> None:
    """Ones in every third column up to a power-of-two total, so that u = j / total lands
    exactly on every running sum, the ends of blocks among them."""
    ones = 256 if vocab > 3 * 256 else 4
    weights = torch.zeros(ones, vocab)
    weights[:, torch.arange(ones) * (vocab // ones) + 1] = 1.0
    uniforms = torch.arange(ones, dtype=torch.float64) / ones
    drawn = BlockedCdf(weights).draw(None, uniforms)
    assert drawn.tolist() == (torch.arange(ones) * (vocab // ones) + 1).tolist()


def test_a_block_sum_above_its_own_running_sum_draws_no_padding(block: int) -> None:
    """A block's sum and the running sum inside it are computed apart and may round
    apart. Where the sum comes out above, a draw near the total must still end on the
    row's last weighted column, not in the padding past the vocabulary."""
    vocab = 3 * block + block // 2 + 1  # 3 whole blocks, then a shorter one, padded
    weights = torch.zeros(2, vocab)
    weights[:, [3 * block, vocab - 1]] = 1.0
    cdf = BlockedCdf(weights)
    cdf.running[:, -1] += 1e-3  # far more than rounding, for a clear margin
    near_the_total = torch.tensor([1.0 - 2.0**-53, 0.9999], dtype=torch.float64)
    assert cdf.draw(None, near_the_total).tolist() == [vocab - 1, vocab - 1]


BINARY = [0.5, 0.25, 0.125, 0.0625, 0.0625]  # every sum exact in float32
BOUNDARY_ROWS = {
    # (probabilities, top_p, min_p, the tokens the definition keeps)
    "decimal-top_p": (PROBS, 0.7, 0.0, {0, 1, 2}),
    "decimal-min_p": (PROBS, 1.0, 0.4, {0, 1, 2, 3}),
    "decimal-both": (PROBS, 0.9, 0.1, {0, 1, 2, 3, 4}),
    "binary-top_p": (BINARY, 0.875, 0.0, {0, 1, 2}),
    "binary-min_p": (BINARY, 1.0, 0.25, {0, 1, 2}),
}


def support(logits: torch.Tensor, top_p: float, min_p: float, max_rounds: int) -> set[int]:
    """The tokens that 2,000 draws of this row take with `max_rounds` accept/refuse rounds
    (0: straight from the fallback's masks)."""
    original = draw_cpu.MAX_ROUNDS
    draw_cpu.MAX_ROUNDS = max_rounds
    try:
        counts = draw_counts(logits, logits.shape[1], top_p, min_p, draws=2000)
    finally:
        draw_cpu.MAX_ROUNDS = original
    return set(counts.nonzero().flatten().tolist())


@pytest.mark.parametrize("case", BOUNDARY_ROWS)
@pytest.mark.parametrize("layout", ["as-listed", "shuffled", "long-tail"])
def test_a_boundary_row_has_one_support_on_every_path(case: str, layout: str) -> None:
    """A row whose nucleus or min_p set ends exactly on a boundary: the masks, the
    accept/refuse draws and their masked fallback keep the same tokens, the ones the
    definition keeps, whatever order the row's sums are taken in. Shuffling the columns
    and spreading the row over 1,000 columns (a tail far below the boundary margin)
    change that order."""
    probs, top_p, min_p, kept = BOUNDARY_ROWS[case]
    row = torch.tensor(probs, dtype=torch.float64)
    columns = list(range(len(probs)))  # where each listed token sits in the row
    if layout == "long-tail":
        columns = [7 * k + 3 for k in range(len(probs))]
        row = torch.full((1000,), BOUNDARY_MARGIN / 100 / 1000, dtype=torch.float64)
        row[columns] = torch.tensor(probs, dtype=torch.float64)
    elif layout == "shuffled":
        order = torch.randperm(len(probs), generator=torch.Generator().manual_seed(len(case)))
        row = row[order]
        columns = order.argsort().tolist()
    logits = (row / row.sum()).log().float().unsqueeze(0)  # [1, vocab]
    expected = {columns[token] for token in kept}
    masked = logits.clone()
    Truncation([logits.shape[1]], [top_p], [min_p]).mask_logits(masked)
    assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == expected
    assert support(logits, top_p, min_p, max_rounds=64) == expected  # accepted, never masked
    assert support(logits, top_p, min_p, max_rounds=0) == expected  # masked fallback only


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
