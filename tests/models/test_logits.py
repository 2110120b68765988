"""Our paged models give transformers' logits: full prefill, chunked prefill, mixed decode."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models.cpu_kernels
import models.linear
import models.quantize
from models.cpu_weights import PackedWeight
from models.linear import CALIBRATED_ROWS
from tests.models.conftest import CASES, Case
from tests.models.paged import PagedSession, relative_error

TOLERANCE = 1e-4
NUM_DECODES = 16

Work = list[tuple[int, list[int]]]


class Driver:
    """Feeds chunks of known full sequences through a session and checks every row's logits."""

    def __init__(self, case: Case, sequences: list[list[int]]) -> None:
        self.case = case
        self.sequences = sequences
        self.session = PagedSession(case.ours.model, block_size=4)
        self.done = [0] * len(sequences)
        self.expected = [case.reference_logits(i, seq) for i, seq in enumerate(sequences)]
        self.embeds = [case.image_embeds(i) for i in range(len(sequences))]

    def step(self, counts: dict[int, int]) -> None:
        """Run the next `counts[i]` tokens of each sequence i in one flat batch, then check."""
        work: Work = []
        image_rows: list[torch.Tensor] = []
        for i, count in counts.items():
            start, end = self.done[i], self.done[i] + count
            work.append((i, self.sequences[i][start:end]))
            image_rows += self._image_rows(i, start, end)
        image_embeds = torch.cat(image_rows) if image_rows else None
        hidden = self.session.step(work, image_embeds)
        for (i, tokens), rows in zip(work, hidden, strict=True):
            logits = self.case.ours.model.compute_logits(rows)
            expected = self.expected[i][self.done[i] : self.done[i] + len(tokens)]
            assert relative_error(logits, expected) < TOLERANCE, (i, self.done[i], len(tokens))
            self.done[i] += len(tokens)

    def _image_rows(self, i: int, start: int, end: int) -> list[torch.Tensor]:
        embeds, image_id = self.embeds[i], self.case.image_token_id
        if embeds is None or image_id is None:
            return []
        before = self.sequences[i][:start].count(image_id)
        inside = self.sequences[i][start:end].count(image_id)
        return [embeds[before : before + inside]] if inside else []


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest, case_factory: Callable[[str], Case]) -> Case:
    return case_factory(request.param)


def test_full_prefill(case: Case) -> None:
    driver = Driver(case, case.prompts)
    driver.step({i: len(p) for i, p in enumerate(case.prompts)})


def test_prefill_in_two_chunks(case: Case) -> None:
    driver = Driver(case, case.prompts)
    halves = {i: len(p) // 2 for i, p in enumerate(case.prompts)}  # cuts through image tokens
    driver.step(halves)
    driver.step({i: len(p) - halves[i] for i, p in enumerate(case.prompts)})


def test_prefill_then_decodes_in_mixed_batches(case: Case) -> None:
    rng = random.Random(1)
    vocab = case.ours.info.vocab_size
    continuations = [[rng.randrange(3, vocab) for _ in range(NUM_DECODES)] for _ in case.prompts]
    if case.image_token_id is not None:
        continuations = [[t if t != case.image_token_id else 5 for t in c] for c in continuations]
    sequences = [p + c for p, c in zip(case.prompts, continuations, strict=True)]
    driver = Driver(case, sequences)
    lens = [len(p) for p in case.prompts]
    driver.step({0: lens[0], 1: lens[1]})
    driver.step({0: 1, 2: lens[2] // 2, 1: 1})  # decodes around a prefill chunk
    driver.step({1: 1, 2: lens[2] - lens[2] // 2, 3: lens[3], 0: 1})
    while any(driver.done[i] < len(seq) for i, seq in enumerate(sequences)):
        driver.step({i: 1 for i, seq in enumerate(sequences) if driver.done[i] < len(seq)})


@pytest.mark.parametrize("kind", sorted(CASES))
def test_decodes_taken_weight_major(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Few-row products in the CPU's other orientation give the same logits. The test
    models fit in cache, so the size that measures is lowered to zero, and every row
    count is made to measure faster weight-major (one row through the padded pair, which
    a CPU with AVX-512 leaves to the kernels' row product: switched off here)."""
    monkeypatch.setattr(models.cpu_kernels, "float_rows_available", lambda: False)
    taken: list[int] = []
    real = models.linear._weight_major

    def counting(columns: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        is_padded_pair = any(columns is pair for _, pair in padded_rows.values())
        taken.append(1 if is_padded_pair else columns.shape[1])
        return real(columns, *args)

    monkeypatch.setattr(models.linear, "STREAMED_WEIGHT_BYTES", 0)
    monkeypatch.setattr(models.linear, "weight_major_rows", lambda timer: CALIBRATED_ROWS)
    monkeypatch.setattr(models.linear, "_weight_major", counting)
    make, wrap = CASES[kind]
    case = wrap(make(tmp_path))
    assert case.ours.model.product.weight_major_rows == set(CALIBRATED_ROWS)
    padded_rows = case.ours.model.product.padded_rows
    test_prefill_then_decodes_in_mixed_batches(case)
    assert 1 in taken and max(taken) <= models.linear.WEIGHT_MAJOR_MAX_ROWS


def test_models_in_cache_keep_f_linear(case: Case) -> None:
    assert case.ours.model.product is F.linear


@pytest.mark.parametrize("kind", sorted(CASES))
def test_packed_float32_weights_give_the_same_logits(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights in oneDNN's layout (used once they stream from memory; the test models are
    smaller, so that size is lowered to zero) give transformers' logits too."""
    monkeypatch.setattr(models.quantize, "STREAMED_WEIGHT_BYTES", 0)
    make, wrap = CASES[kind]
    case = wrap(make(tmp_path))
    model = case.ours.model
    assert isinstance(model.lm_head, PackedWeight)
    for layer in model.layers:
        fields = vars(layer.w).values()
        matrices = [v for v in fields for v in (v if isinstance(v, tuple) else (v,))]
        packed = [m for m in matrices if isinstance(m, PackedWeight)]
        assert len(packed) == 4 and all(m.plain is not None for m in packed)  # one-row form
    test_prefill_then_decodes_in_mixed_batches(case)
