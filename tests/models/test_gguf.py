"""GGUF files: the same model as the safetensors folder they were written from.

Each tiny checkpoint is written as GGUF in f32, f16 and Q8_0 (tests/gguf_files.py) and
loaded through `load_model`: logits within what the file's type keeps, greedy outputs
equal to transformers' generate() on the folder for f32, and logits within 1e-4 of
transformers' own model of the same quantised file (the same dequantised weights).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from models import LoadedModel, ModelLoadError, load_model
from models import gguf as gguf_loading
from tests.checkpoints import make_tiny_llama, make_tiny_qwen2, make_tiny_qwen3
from tests.gemma3_checkpoints import make_tiny_gemma3_text
from tests.gguf_files import write_gguf
from tests.models.conftest import Case, text_prompts
from tests.models.paged import PagedSession, relative_error
from tests.models.test_generate import our_greedy, reference_greedy
from tests.models.test_logits import Driver


def make_tiny_gemma3_as_llama_cpp_reads_it(out_dir: Path) -> Path:
    """llama.cpp's Gemma 3: every sixth layer global, attention scaled by head_dim."""
    return make_tiny_gemma3_text(
        out_dir, num_hidden_layers=6, sliding_window_pattern=6, query_pre_attn_scalar=24
    )


MAKERS = {
    "llama": make_tiny_llama,
    "qwen2": make_tiny_qwen2,
    "qwen3": make_tiny_qwen3,
    "gemma3": make_tiny_gemma3_as_llama_cpp_reads_it,
}
# max |difference| / max |logit| against the folder's float32 weights
TOLERANCES = {"f32": 1e-6, "f16": 5e-3, "q8_0": 5e-2}
# Gemma 3's six layers (llama.cpp makes every sixth global) add up more rounding than two:
# q8_0 measured 0.067 (the same file read by transformers stays within 1e-4 of ours)
DEPTH_ALLOWANCE = {"gemma3": 2.0}
GgufFactory = Callable[[str, str], Path]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = MAKERS[kind](tmp_path_factory.mktemp(kind))
        return built[kind]

    return get


@pytest.fixture(scope="module")
def gguf_file(
    folders: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> GgufFactory:
    def get(kind: str, tensor_type: str) -> Path:
        out = tmp_path_factory.mktemp(f"{kind}-{tensor_type}") / f"tiny-{kind}.gguf"
        return write_gguf(folders(kind), out, tensor_type)

    return get


def prefill_logits(loaded: LoadedModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    model = loaded.model
    hidden = PagedSession(model, block_size=4).step(list(enumerate(prompts)))
    return [model.compute_logits(rows) for rows in hidden]


@pytest.mark.parametrize("tensor_type", sorted(TOLERANCES))
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_logits_match_the_safetensors_folder(
    kind: str, tensor_type: str, folders: Callable[[str], Path], gguf_file: GgufFactory
) -> None:
    from_folder = load_model(folders(kind))
    from_gguf = load_model(gguf_file(kind, tensor_type))
    assert from_gguf.info.architecture == from_folder.info.architecture
    assert from_gguf.info.head_dim == from_folder.info.head_dim
    prompts = text_prompts(from_folder.info.vocab_size, {0, 1, 2})
    pairs = zip(
        prefill_logits(from_gguf, prompts), prefill_logits(from_folder, prompts), strict=True
    )
    errors = [relative_error(ours, folder) for ours, folder in pairs]
    assert max(errors) < TOLERANCES[tensor_type] * DEPTH_ALLOWANCE.get(kind, 1.0), errors
    if tensor_type != "f32":
        assert max(errors) > 0  # the file really holds the rounded weights


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_f32_greedy_equals_generate_on_the_folder(
    kind: str, folders: Callable[[str], Path], gguf_file: GgufFactory
) -> None:
    ours = load_model(gguf_file(kind, "f32"))
    reference = AutoModelForCausalLM.from_pretrained(folders(kind)).eval()
    prompts = text_prompts(ours.info.vocab_size, {0, 1, 2})
    case = Case(folders(kind), ours, reference, prompts, [None] * len(prompts))
    for index, tokens in enumerate(our_greedy(case)):
        assert tokens == reference_greedy(case, index), index


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_q8_0_logits_match_transformers_reading_the_same_file(
    kind: str, gguf_file: GgufFactory
) -> None:
    path = gguf_file(kind, "q8_0")
    ours = load_model(path)
    _, config = gguf_loading.read_config(path)
    reference = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=torch.float32
    ).eval()
    prompts = text_prompts(ours.info.vocab_size, {0, 1, 2})
    case = Case(path, ours, reference, prompts, [None] * len(prompts))
    driver = Driver(case, prompts)
    driver.step({i: len(p) for i, p in enumerate(prompts)})  # asserts 1e-4 on every row


def test_the_tokenizer_and_chat_template_come_from_the_file(
    folders: Callable[[str], Path], gguf_file: GgufFactory
) -> None:
    from_folder = load_model(folders("qwen3"))
    from_gguf = load_model(gguf_file("qwen3", "f32"))
    text = "the red circle is left of two blue squares: café 東京 😀"
    assert from_gguf.tokenizer(text).input_ids == from_folder.tokenizer(text).input_ids
    assert from_gguf.chat_template == from_folder.chat_template
    assert from_gguf.info.eos_token_ids == from_folder.info.eos_token_ids
    assert from_gguf.info.bos_token_id == from_folder.info.bos_token_id
    assert from_gguf.info.max_model_len == from_folder.info.max_model_len


def test_a_folder_holding_one_gguf_file_loads_it(gguf_file: GgufFactory) -> None:
    path = gguf_file("llama", "q8_0")
    loaded = load_model(path.parent, dtype="bfloat16")
    assert loaded.path == str(path)
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.model.lm_head.dtype == torch.bfloat16


def test_a_folder_holding_two_gguf_files_is_refused(gguf_file: GgufFactory) -> None:
    path = gguf_file("llama", "f16")
    (path.parent / "other.gguf").write_bytes(path.read_bytes())
    with pytest.raises(ModelLoadError, match=r"2 GGUF files .*; name one of them") as error:
        load_model(path.parent)
    assert error.value.path == str(path.parent)


def _header_only(path: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_head_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        ("gpt2", "unsupported GGUF architecture 'gpt2'; supported: llama, qwen2, qwen3, gemma3"),
        ("no-such-arch", "cannot read the GGUF metadata"),
    ],
)
def test_architectures_we_cannot_serve_are_refused_naming_the_file(
    tmp_path: Path, architecture: str, message: str
) -> None:
    path = _header_only(tmp_path / "model.gguf", architecture)
    with pytest.raises(ModelLoadError, match=message) as error:
        load_model(path)
    assert error.value.path == str(path)


def test_tensors_that_cannot_be_read_are_refused_naming_the_file(
    gguf_file: GgufFactory, tmp_path: Path
) -> None:
    whole = gguf_file("qwen2", "q8_0").read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(whole[: len(whole) - 1000])
    with pytest.raises(ModelLoadError) as error:
        load_model(path)
    assert error.value.path == str(path)


def test_a_file_missing_a_tensor_is_refused_naming_it(
    folders: Callable[[str], Path], tmp_path: Path
) -> None:
    missing = "model.layers.1.mlp.down_proj.weight"
    path = write_gguf(folders("llama"), tmp_path / "holey.gguf", "f16", leave_out=(missing,))
    with pytest.raises(ModelLoadError, match=f"1 tensors missing from the file: '{missing}'"):
        load_model(path)


LLAMA_ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
        "rope_theta": 10000.0,
    },
}


@pytest.mark.parametrize("rope", sorted(LLAMA_ROPES))
def test_rope_scaling_in_the_file_gives_the_folders_logits(tmp_path: Path, rope: str) -> None:
    """A linear factor in llama.cpp's keys; Llama 3's as the rope_freqs factors."""
    folder = make_tiny_llama(tmp_path / "folder", rope_parameters=LLAMA_ROPES[rope])
    path = write_gguf(folder, tmp_path / "scaled.gguf")
    prompts = [[1, *range(3, 3 + n)] for n in (40, 90)]  # past the original context
    from_gguf, from_folder = load_model(path), load_model(folder)
    pairs = zip(
        prefill_logits(from_gguf, prompts), prefill_logits(from_folder, prompts), strict=True
    )
    assert max(relative_error(ours, folder) for ours, folder in pairs) < TOLERANCES["f32"]


def test_other_rope_scaling_is_refused_naming_the_file(
    folders: Callable[[str], Path], tmp_path: Path
) -> None:
    path = write_gguf(folders("llama"), tmp_path / "yarn.gguf", rope_scaling_type="yarn")
    with pytest.raises(ModelLoadError, match="GGUF rope scaling 'yarn' is not supported") as error:
        load_model(path)
    assert error.value.path == str(path)
