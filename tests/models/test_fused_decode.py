"""The C++ one-stream decode (models/fused_decode.py) computes the torch path's logits,
and applies only where it can."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

import models.fused_decode
import models.linear
import models.quantize
from models import cpu_kernels, load_model
from models.attention_inputs import AttentionInputs
from models.base import PagedModel
from models.cpu_weights import FbgemmInt8Weight
from models.fused_decode import FusedDecodeCache, FusedGPT2Decode, FusedLlamaDecode
from models.layers import field_values
from models.linear import CALIBRATED_ROWS, OrientedLinear
from models.lora import enable_lora
from tests.checkpoints import make_tiny_gpt2, make_tiny_llama
from tests.models.conftest import CASES
from tests.models.paged import PagedSession, relative_error
from tests.qwen_vl_checkpoints import make_tiny_qwen_vl
from tests.smolvlm_checkpoints import make_tiny_smolvlm

# Llama-family decoders: plain, biased with its own head_dim, Qwen2's q/k/v bias, Qwen3's
# QK-norm, a LLaVA's language model; and GPT-2.
FUSED_KINDS = (
    "llama_gqa_untied",
    "llama_bias_head_dim",
    "qwen2_qkv_bias",
    "qwen3_qk_norm",
    "llava_clip",
    "gpt2_tied",
)
TOLERANCE = 1e-5  # relative, against the torch path's logits
# An activation that float rounding puts on the other side of an int8 step rounds to the
# next integer: far below int8's own error (tests/models/test_int8.py), but above float's.
INT8_TOLERANCE = 1e-2
NUM_DECODES = 12


def test_the_kernels_build_on_this_machine() -> None:
    assert cpu_kernels.available()


class CountingRuns:
    """Counts the kernels' decode steps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.masks_made = 0  # decode masks built in steps the kernel ran (it reads none)
        for kind in (FusedLlamaDecode, FusedGPT2Decode):
            monkeypatch.setattr(kind, "run", self._counted(kind.run))

    def _counted(self, real: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def counted(*args: object) -> torch.Tensor:
            self.count += 1
            result = real(*args)
            attn_inputs = args[3]
            assert isinstance(attn_inputs, AttentionInputs)
            self.masks_made += sum(g.cached_mask is not None for g in attn_inputs.decode_groups)
            return result

        return counted


def decode_logits(model: PagedModel, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """A prompt prefilled, then one decode step per token; the logits of each decode."""
    session = PagedSession(model, block_size=4)
    session.step([(0, prompt)])
    logits = []
    for token in tokens:
        (hidden,) = session.step([(0, [token])])
        logits.append(model.compute_logits(hidden))
    return logits


def fused_and_torch_logits(
    model: PagedModel,
    seed: int = 0,
    prompt_len: int = 9,
    reference: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The kernel's logits, and the torch path's (computed inside `reference`)."""
    rng = random.Random(seed)
    info = model.info
    allowed = [t for t in range(3, info.vocab_size) if t != info.image_token_id]
    prompt, tokens = rng.choices(allowed, k=prompt_len), rng.choices(allowed, k=NUM_DECODES)
    cache = fused_decode_of(model)
    cache.get()  # built with the model as it is, before `reference` changes anything
    cache.enabled = False
    with reference():
        expected = decode_logits(model, prompt, tokens)
    cache.enabled = True
    return decode_logits(model, prompt, tokens), expected


def fused_decode_of(model: PagedModel) -> FusedDecodeCache:
    cache = getattr(model, "fused_decode", None)
    assert isinstance(cache, FusedDecodeCache)
    return cache


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fused_decode_gives_the_torch_paths_logits(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = CountingRuns(monkeypatch)
    make, _ = CASES[kind]
    model = load_model(make(tmp_path)).model
    fused, expected = fused_and_torch_logits(model)
    assert runs.count == NUM_DECODES and runs.masks_made == 0
    for ours, reference in zip(fused, expected, strict=True):
        assert relative_error(ours, reference) < TOLERANCE


@pytest.mark.parametrize(
    "make",
    [
        make_tiny_qwen_vl,
        partial(make_tiny_qwen_vl, family="qwen2_5_vl"),
        partial(make_tiny_qwen_vl, family="qwen3_vl"),
        make_tiny_smolvlm,
    ],
    ids=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm"],
)
def test_vision_language_decoders(
    make: Callable[[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their text decoders are Llama-family ones (Qwen-VL's with multi-section rotary
    positions, looked up before the kernel is called; Qwen3-VL's with QK-norm, and
    DeepStack only in steps that hold image rows)."""
    runs = CountingRuns(monkeypatch)
    model = load_model(make(tmp_path)).model
    fused, expected = fused_and_torch_logits(model, seed=5)
    assert runs.count == NUM_DECODES
    for ours, reference in zip(fused, expected, strict=True):
        assert relative_error(ours, reference) < TOLERANCE


@pytest.mark.parametrize(
    "overrides",
    [{"activation_function": "gelu"}, {"scale_attn_by_inverse_layer_idx": True}],
    ids=["exact_gelu", "scale_by_layer"],
)
def test_gpt2_variants(overrides: dict[str, Any], tmp_path: Path) -> None:
    model = load_model(make_tiny_gpt2(tmp_path, **overrides)).model
    fused, expected = fused_and_torch_logits(model, seed=3)
    assert fused_decode_of(model).get() is not None
    for ours, reference in zip(fused, expected, strict=True):
        assert relative_error(ours, reference) < TOLERANCE


def test_an_activation_the_kernel_lacks_keeps_the_torch_path(tmp_path: Path) -> None:
    model = load_model(make_tiny_llama(tmp_path, hidden_act="gelu")).model
    assert fused_decode_of(model).get() is None


@pytest.mark.parametrize("kind", ["llama_gqa_untied", "qwen3_bias_untied", "gpt2_tied"])
def test_packed_weights_taken_weight_major(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights that stream from memory (packed, with their plain copy) and a product that
    takes one row weight-major: the kernel reads the plain copies in that orientation."""
    monkeypatch.setattr(models.linear, "STREAMED_WEIGHT_BYTES", 0)
    monkeypatch.setattr(models.quantize, "STREAMED_WEIGHT_BYTES", 0)
    monkeypatch.setattr(models.linear, "weight_major_rows", lambda timer: CALIBRATED_ROWS)
    runs = CountingRuns(monkeypatch)
    make, _ = CASES[kind]
    model = load_model(make(tmp_path)).model
    assert isinstance(model.product.float_product, OrientedLinear)  # type: ignore[attr-defined]
    fused, expected = fused_and_torch_logits(model, seed=1)
    build = fused_decode_of(model).get()
    assert isinstance(build, FusedLlamaDecode | FusedGPT2Decode) and build.weights.weight_major
    assert runs.count == NUM_DECODES
    for ours, reference in zip(fused, expected, strict=True):
        assert relative_error(ours, reference) < TOLERANCE


@pytest.mark.parametrize(("threads", "prompt_len"), [(2, 40), (32, 3)])
def test_long_sequences_attend_on_several_threads(
    threads: int, prompt_len: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attention split into one span of tokens per thread and merged (every step, with the
    threshold at zero); with more threads than tokens, some spans hold none."""
    monkeypatch.setattr(models.fused_decode, "PARALLEL_ATTENTION_WORK", 0)
    make, _ = CASES["llama_gqa_untied"]
    model = load_model(make(tmp_path)).model
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused, expected = fused_and_torch_logits(model, seed=2, prompt_len=prompt_len)
    finally:
        torch.set_num_threads(previous)
    for ours, reference in zip(fused, expected, strict=True):
        assert relative_error(ours, reference) < TOLERANCE


def test_several_decodes_in_a_step_take_the_torch_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = CountingRuns(monkeypatch)
    make, _ = CASES["llama_gqa_untied"]
    model = load_model(make(tmp_path)).model
    session = PagedSession(model, block_size=4)
    session.step([(0, [5, 6, 7]), (1, [8, 9])])
    session.step([(0, [10]), (1, [11])])
    session.step([(0, [12]), (2, [13, 14])])  # a decode beside a prefill
    assert runs.count == 0
    session.step([(1, [15])])
    assert runs.count == 1


@pytest.mark.parametrize("form", ["fbgemm", "vnni_rows"])
@pytest.mark.parametrize("kind", ["llama_bias_head_dim", "qwen3_qk_norm", "gpt2_tied"])
def test_int8_matrices(
    kind: str, form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With FBGEMM's int8 matrices the kernel calls the same FBGEMM product on rows
    scaled as `FbgemmInt8Weight.linear` scales them; with their int8 rows kept too, the
    VNNI product, against a torch path on FBGEMM alone (whose one-row products would
    otherwise take the rows too)."""
    if form == "vnni_rows" and not cpu_kernels.int8_rows_available():
        pytest.skip("no AVX-512 VNNI")
    runs = CountingRuns(monkeypatch)
    make, _ = CASES[kind]
    model = load_model(make(tmp_path), quantization="int8").model
    int8_weights = [model.lm_head, *(v for layer in model.layers for v in field_values(layer.w))]
    int8_weights = [weight for weight in int8_weights if isinstance(weight, FbgemmInt8Weight)]

    @contextlib.contextmanager
    def fbgemm_only() -> Iterator[None]:
        kept = [weight.rows for weight in int8_weights]
        for weight in int8_weights:
            weight.rows = None
        yield
        for weight, rows in zip(int8_weights, kept, strict=True):
            weight.rows = rows

    if form == "fbgemm":
        fbgemm_only().__enter__()  # for good
    build = fused_decode_of(model).get()
    assert isinstance(build, FusedLlamaDecode | FusedGPT2Decode)
    layers = model.info.num_layers
    assert len(build.weights.int8) == 4 * layers
    assert len(build.weights.int8_rows) == (3 * 4 * layers if form == "vnni_rows" else 0)
    fused, expected = fused_and_torch_logits(model, seed=4, reference=fbgemm_only)
    assert runs.count == NUM_DECODES
    for ours, reference in zip(fused, expected, strict=True):
        assert relative_error(ours, reference) < INT8_TOLERANCE


def test_bfloat16_keeps_the_torch_path(tmp_path: Path) -> None:
    make, _ = CASES["llama_gqa_untied"]
    model = load_model(make(tmp_path), dtype="bfloat16").model
    assert fused_decode_of(model).get() is None


def test_adapters_switch_the_kernel_off(tmp_path: Path) -> None:
    """LoRA's products replace the layers' own once adapters are enabled: the kernel,
    which knows nothing of them, must step aside."""
    make, _ = CASES["llama_gqa_untied"]
    model = load_model(make(tmp_path)).model
    decoder = model.decoder  # type: ignore[attr-defined]
    assert decoder.fused_decode.get() is not None
    enable_lora(model, max_loras=1, max_rank=4)
    assert decoder.fused_decode.get() is None


def test_a_foreign_product_in_any_layer_switches_the_kernel_off(tmp_path: Path) -> None:
    make, _ = CASES["llama_gqa_untied"]
    decoder = load_model(make(tmp_path)).model.decoder  # type: ignore[attr-defined]
    assert decoder.fused_decode.get() is not None
    decoder.layers[-1].product = lambda x, weight, bias=None: torch.nn.functional.linear(
        x, weight, bias
    )
    assert decoder.fused_decode.get() is None


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernels.DISABLE_VARIABLE, "0")
    cpu_kernels.library.cache_clear()
    try:
        assert not cpu_kernels.available()
    finally:
        cpu_kernels.library.cache_clear()


def test_a_lock_left_by_a_killed_build_is_cleared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cpp_extension waits for its build folder's lock to go: one left by a process killed
    mid-build would hold every later start. A recent one may be a build running now."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = Path(cpp_extension._get_build_directory(cpu_kernels.NAME, verbose=False))
    lock = folder / "lock"
    lock.write_text("")
    cpu_kernels.clear_stale_lock(folder)
    assert lock.exists()
    long_ago = time.time() - cpu_kernels.STALE_LOCK_SECONDS - 60
    os.utime(lock, (long_ago, long_ago))
    lock_at_build: list[bool] = []

    def load(**kwargs: object) -> str:
        lock_at_build.append(lock.exists())
        return "built"

    monkeypatch.setattr(cpp_extension, "load", load)
    assert cpu_kernels._build() == "built"
    assert lock_at_build == [False]
    cpu_kernels.clear_stale_lock(folder)  # no lock: nothing to do


def test_a_library_built_ahead_loads_without_a_build(tmp_path: Path) -> None:
    """What the Docker image does: `python -m models.cpu_kernels` builds the library and
    prints its path; a process that names it loads it with an empty extension cache (a
    build would land there)."""
    built = subprocess.run(
        [sys.executable, "-m", "models.cpu_kernels"], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    library = built.stdout.strip().splitlines()[-1]
    assert Path(library).is_file()
    empty_cache = tmp_path / "extensions"
    environment = {
        **os.environ,
        cpu_kernels.LIBRARY_VARIABLE: library,
        "TORCH_EXTENSIONS_DIR": str(empty_cache),
    }
    check = "import torch; from models import cpu_kernels; print(cpu_kernels.library()); " + (
        "print(torch.ops.mmgpt.llama_decode.default.name())"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [library, "mmgpt::llama_decode"]
    assert not empty_cache.exists()


def test_the_kernel_refuses_inputs_it_cannot_read(tmp_path: Path) -> None:
    make, _ = CASES["llama_gqa_untied"]
    model = load_model(make(tmp_path)).model
    session = PagedSession(model, block_size=4)
    session.step([(0, [5, 6, 7])])
    attn_inputs, positions = session.attention_inputs([(0, [8])])
    fused = fused_decode_of(model).get()
    assert fused is not None
    hidden = model.decoder.embed(torch.tensor([8]))  # type: ignore[attr-defined]
    cos_sin = model.decoder.rope.lookup(positions)  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="float32 on the CPU"):
        fused.run(hidden.bfloat16(), cos_sin, attn_inputs, session.cache)


def test_decode_weights_refuse_what_the_kernels_cannot_read() -> None:
    assert cpu_kernels.available()
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.classes.mmgpt.DecodeWeights(
            [torch.ones(2, 2).bfloat16()], [], False, [], 1.0, 0, False
        )
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.classes.mmgpt.DecodeWeights([torch.ones(2, 2).t()], [], False, [], 1.0, 0, False)
