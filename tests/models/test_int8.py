"""int8 weights (models/quantize.py) stay close to float32: logits within a stated
tolerance of transformers' own, greedy continuations mostly the same; FBGEMM's products
within the bound their activation rounding allows, each row's independent of its batch;
the VNNI row product computing FBGEMM's numbers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import models.quantize
from models import cpu_kernels, load_model
from models.cpu_weights import FbgemmInt8Weight, PreparedProduct
from models.layers import field_values
from models.linear import Int8Weight
from models.quantize import prepare_decoder
from tests.models.conftest import Case
from tests.models.paged import PagedSession, relative_error
from tests.models.test_generate import reference_greedy

# max |int8 logits - fp32 reference| / max |reference|; fp32 itself stays under 1e-4
LOGIT_TOLERANCE = 0.04  # measured up to 0.023 on these checkpoints
# share of generate()'s greedy tokens that int8 also picks, fed the same prefix
MIN_GREEDY_AGREEMENT = 0.9  # measured 0.96 (Llama, LLaVA) and 1.0 (GPT-2)
INT8_CASES = ("llama_gqa_untied", "qwen3_bias_untied", "gpt2_tied", "llava_clip")


@pytest.fixture(params=INT8_CASES)
def int8_case(request: pytest.FixtureRequest, case_factory: Callable[[str], Case]) -> Case:
    case = case_factory(request.param)
    return Case(
        case.folder, load_model(case.folder, quantization="int8"), case.reference,
        case.prompts, case.pixel_values,
    )  # fmt: skip


def test_quantize_rounds_each_row_to_its_own_scale() -> None:
    weight = torch.randn(6, 10) * torch.arange(1, 7).unsqueeze(1)  # rows of different sizes
    quantized = Int8Weight.quantize(weight)
    assert quantized.values.dtype == torch.int8 and quantized.values.abs().max() == 127
    restored = quantized.values.float() * quantized.scales[:, None]
    assert torch.all((restored - weight).abs() <= quantized.scales[:, None] / 2 + 1e-6)


def _restored(weight: torch.Tensor) -> torch.Tensor:
    quantized = Int8Weight.quantize(weight)
    return quantized.values.float() * quantized.scales[:, None]


def test_int8_product_is_the_float_product_of_the_restored_weight() -> None:
    weight, bias, rows = torch.randn(12, 8), torch.randn(12), torch.randn(3, 8)
    product = PreparedProduct(F.linear)
    expected = F.linear(rows, _restored(weight), bias)
    torch.testing.assert_close(product(rows, Int8Weight.quantize(weight), bias), expected)
    torch.testing.assert_close(product(rows, weight, bias), F.linear(rows, weight, bias))


needs_fbgemm = pytest.mark.skipif(not FbgemmInt8Weight.available(), reason="no FBGEMM")


@needs_fbgemm
def test_fbgemm_product_is_within_its_activation_rounding() -> None:
    """Activations round to 255 steps over [-peak, peak] of their row: each output may be
    off by |restored weight| . (peak / 255) and no more (float error aside)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 64), torch.randn(40)
    rows = torch.randn(5, 64) * torch.tensor([[0.01], [1.0], [3.0], [100.0], [1.0]])
    restored = _restored(weight)
    out = FbgemmInt8Weight(weight).linear(rows, bias)
    peaks = rows.abs().amax(dim=1, keepdim=True)
    bound = (peaks / 255) @ restored.abs().sum(dim=1, keepdim=True).T  # [5, 40]
    error = (out - F.linear(rows, restored, bias)).abs()
    assert torch.all(error <= bound * 1.001 + 1e-4), (error / bound).max()
    assert error.max() > 0  # activations really were rounded


@needs_fbgemm
def test_fbgemm_row_results_do_not_depend_on_the_batch() -> None:
    """One scale for the whole tensor would let a large row coarsen the others."""
    torch.manual_seed(1)
    quantized = FbgemmInt8Weight(torch.randn(24, 32))
    rows = torch.randn(6, 32)
    rows[2] *= 1000  # a row whose peak dwarfs the others'
    batched = quantized.linear(rows, None)
    alone = torch.cat([quantized.linear(rows[i : i + 1], None) for i in range(len(rows))])
    assert torch.equal(batched, alone)
    assert torch.equal(quantized.linear(torch.zeros(2, 32), None), torch.zeros(2, 24))
    assert quantized.linear(rows.view(2, 3, 32), None).shape == (2, 3, 24)


needs_vnni_rows = pytest.mark.skipif(
    not cpu_kernels.int8_rows_available(), reason="no AVX-512 VNNI, or no kernels"
)


@needs_vnni_rows
@pytest.mark.parametrize("shape", [(40, 64), (37, 100), (130, 576)])  # a tail, many rows
def test_vnni_one_row_product_computes_fbgemms(shape: tuple[int, int]) -> None:
    """The same integers, the same activation rounding: FBGEMM's results but for float
    rounding in the final scaling."""
    torch.manual_seed(2)
    weight, bias = torch.randn(*shape), torch.randn(shape[0])
    with_rows, fbgemm_only = FbgemmInt8Weight(weight, one_row=True), FbgemmInt8Weight(weight)
    assert with_rows.rows is not None and fbgemm_only.rows is None
    row = torch.randn(1, shape[1]) * 3
    row[0, 0] = 1e-4  # a value that rounds to the zero point
    for b in (bias, None):
        expected = fbgemm_only.linear(row, b)
        ours = with_rows.linear(row, b)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    zeros = torch.zeros(1, shape[1])
    assert torch.equal(with_rows.linear(zeros, None), torch.zeros(1, shape[0]))
    several = torch.randn(3, shape[1])  # more rows than one: FBGEMM's own product
    assert torch.equal(with_rows.linear(several, bias), fbgemm_only.linear(several, bias))


@needs_vnni_rows
def test_int8_rows_kept_only_up_to_the_memory_cap(
    case_factory: Callable[[str], Case], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = case_factory("llama_gqa_untied").folder
    model = load_model(folder, quantization="int8").model
    assert all(w.rows is not None for w in _fbgemm_weights(model))
    monkeypatch.setattr(models.quantize, "KEEP_PLAIN_MAX_BYTES", 0)
    model = load_model(folder, quantization="int8").model
    assert _fbgemm_weights(model) and all(w.rows is None for w in _fbgemm_weights(model))


def _fbgemm_weights(model: object) -> list[FbgemmInt8Weight]:
    found = [getattr(model, "lm_head", None)]
    for layer in getattr(model, "layers", []):
        found += list(field_values(layer.w))
    return [value for value in found if isinstance(value, FbgemmInt8Weight)]


def test_every_layer_matrix_is_int8(int8_case: Case) -> None:
    model = int8_case.ours.model
    kind = FbgemmInt8Weight if FbgemmInt8Weight.available() else Int8Weight
    assert isinstance(model.product, PreparedProduct)
    for layer in model.layers:
        assert layer.product is model.product
        fields = [v for name, v in vars(layer.w).items() if not name.endswith("norm")]
        matrices = [v for v in fields for v in (v if isinstance(v, tuple) else (v,))]
        assert not [m for m in matrices if isinstance(m, torch.Tensor) and m.dim() == 2]
        assert isinstance(getattr(layer.w, "qk_norm", None), torch.Tensor | None)  # scales
        assert sum(isinstance(m, kind) for m in matrices) == 4  # qkv, out, MLP in and out
    assert isinstance(model.lm_head, FbgemmInt8Weight) == FbgemmInt8Weight.available()


def test_int8_logits_stay_near_float32(int8_case: Case) -> None:
    hidden = _prefill(int8_case, int8_case.prompts)
    for index, rows in enumerate(hidden):
        expected = int8_case.reference_logits(index, int8_case.prompts[index])
        error = relative_error(int8_case.ours.model.compute_logits(rows), expected)
        assert 0 < error < LOGIT_TOLERANCE, (index, error)


def test_int8_greedy_mostly_agrees_with_generate(int8_case: Case) -> None:
    """Teacher-forced: at each step of generate()'s greedy continuation, int8's argmax."""
    continuations = [reference_greedy(int8_case, i) for i in range(len(int8_case.prompts))]
    sequences = [p + c[:-1] for p, c in zip(int8_case.prompts, continuations, strict=True)]
    agreed = total = 0
    for rows, continuation in zip(_prefill(int8_case, sequences), continuations, strict=True):
        chosen = int8_case.ours.model.compute_logits(rows[-len(continuation) :]).argmax(-1)
        agreed += int((chosen == torch.tensor(continuation)).sum())
        total += len(continuation)
    assert agreed / total >= MIN_GREEDY_AGREEMENT, (agreed, total)


def _prefill(case: Case, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Hidden states [len(sequence), hidden] of each sequence, all in one flat batch."""
    session = PagedSession(case.ours.model, block_size=4)
    embeds = [case.image_embeds(i) for i in range(len(sequences))]
    present = [e for e in embeds if e is not None]
    return session.step(list(enumerate(sequences)), torch.cat(present) if present else None)


def test_unknown_quantization_is_refused(case_factory: Callable[[str], Case]) -> None:
    with pytest.raises(ValueError, match="int4"):
        prepare_decoder(case_factory("gpt2_tied").ours.model, "int4")
