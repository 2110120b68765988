"""load_model: what it reads from a folder, the weight-name layouts, and its clear errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import models.quantize
from models import ModelLoadError, checkpoint, load_model
from models.base import PagedModel
from models.cpu_weights import PackedWeight
from tests.checkpoints import make_tiny_gpt2, make_tiny_llama, make_tiny_llava, write_mmgpt_json
from tests.models.paged import PagedSession, relative_error


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("sharded"), shards=3)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture
def broken(tmp_path: Path) -> Callable[[Path], Path]:
    """A private copy of a checkpoint folder to break."""

    def copy(folder: Path) -> Path:
        return Path(shutil.copytree(folder, tmp_path / folder.name))

    return copy


def _prefill_logits(folder: Path, prompt: list[int]) -> torch.Tensor:
    model = load_model(folder).model
    rows = PagedSession(model).step([(0, prompt)])[0]
    return model.compute_logits(rows)


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_llama_info_and_companions(llama_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(llama_dir)
    _edit_json(folder / "generation_config.json", eos_token_id=[2, 7])
    write_mmgpt_json(folder, caption_prompt="What is shown?")
    loaded = load_model(folder)
    info = loaded.info
    assert (info.architecture, info.num_layers, info.num_kv_heads, info.head_dim) == (
        "LlamaForCausalLM",
        2,
        2,
        16,
    )
    assert (info.hidden_size, info.vocab_size, info.max_model_len) == (64, 384, 256)
    assert info.eos_token_ids == (2, 7)
    assert (info.bos_token_id, info.pad_token_id, info.image_token_id) == (1, 0, None)
    assert info.caption_prompt == "What is shown?"
    assert info.name == folder.name and info.dtype == torch.float32
    assert loaded.generation_defaults["temperature"] == 0.7
    assert "eos_token_id" not in loaded.generation_defaults
    assert loaded.chat_template and loaded.image_processor is None
    assert loaded.tokenizer.decode(loaded.tokenizer("naïve café").input_ids[1:]) == "naïve café"
    assert info.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4


def test_llava_info(llava_dir: Path) -> None:
    loaded = load_model(llava_dir)
    info = loaded.info
    assert info.is_multimodal and info.image_token_id == loaded.tokenizer.image_token_id
    assert (info.image_seq_length, info.image_size) == (16, 32)
    processor = loaded.image_processor
    assert processor is not None
    pixels = processor(images=[Image.new("RGB", (50, 40), "red")], return_tensors="pt")
    embeds = loaded.model.encode_images(pixels["pixel_values"])
    assert embeds.shape == (1, 16, info.hidden_size)


@pytest.mark.parametrize("layout", ["modules", "llava-hf"])
def test_llava_weight_layouts_load_the_same_model(
    llava_dir: Path, tmp_path: Path, layout: str
) -> None:
    renamed = make_tiny_llava(tmp_path / layout, weight_layout=layout)
    prompt = [1, 9, *[3] * 16, 40, 41]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = load_model(renamed).model
    rows = PagedSession(model).step([(0, prompt)], model.encode_images(pixels)[0])[0]
    reference = AutoModelForImageTextToText.from_pretrained(llava_dir)
    expected = reference(input_ids=torch.tensor([prompt]), pixel_values=pixels).logits[0]
    assert relative_error(model.compute_logits(rows), expected) < 1e-4


@pytest.mark.parametrize(
    ("vision", "feature_layer", "strategy", "tokens"),
    [("clip", [-3, -1], "full", 17), ("siglip", -2, "default", 15)],
)
def test_llava_feature_layers_and_strategies(
    tmp_path: Path, vision: str, feature_layer: int | list[int], strategy: str, tokens: int
) -> None:
    folder = make_tiny_llava(
        tmp_path / "llava",
        vision=vision,  # type: ignore[arg-type]
        vision_feature_layer=feature_layer,
        select_strategy=strategy,  # type: ignore[arg-type]
    )
    model = load_model(folder).model
    assert model.info.image_seq_length == tokens
    prompt = [1, 9, *[3] * tokens, 40, 41]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = PagedSession(model).step([(0, prompt)], model.encode_images(pixels)[0])[0]
    reference = AutoModelForImageTextToText.from_pretrained(folder)
    expected = reference(input_ids=torch.tensor([prompt]), pixel_values=pixels).logits[0]
    assert relative_error(model.compute_logits(rows), expected) < 1e-4


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
    ids=lambda rope: rope["rope_type"],
)
def test_rope_scaling_types(tmp_path: Path, rope: dict) -> None:
    folder = make_tiny_llama(tmp_path / "rope", rope_parameters=rope)
    prompt = list(range(3, 43))
    expected = AutoModelForCausalLM.from_pretrained(folder)(torch.tensor([prompt])).logits[0]
    assert relative_error(_prefill_logits(folder, prompt), expected) < 1e-4


def _llava_logits(model: PagedModel) -> torch.Tensor:
    """A prefill with an image, then one decode (a one-row product)."""
    prompt = [1, 9, *[3] * 16, 40, 41, 42, 43, 44]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = PagedSession(model)
    rows = session.step([(0, prompt)], model.encode_images(pixels)[0])[0]
    decoded = session.step([(0, [50])])[0]
    assert session.cache[0][0].dtype == model.info.dtype
    return model.compute_logits(torch.cat([rows, decoded]))


def test_bfloat16_runs_close_to_float32(llava_dir: Path) -> None:
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(llava_dir, dtype=dtype).model
        logits[dtype] = _llava_logits(model)
        assert model.info.dtype == dtype
    assert logits[torch.bfloat16].dtype == torch.float32
    assert relative_error(logits[torch.bfloat16], logits[torch.float32]) < 0.05


def test_packed_bfloat16_weights_run_as_the_plain_ones(
    llava_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 weights in oneDNN's layout (once they stream from memory: the size is lowered
    to zero here) give the plain bf16 model's logits, one-row products packed too."""
    plain = _llava_logits(load_model(llava_dir, dtype=torch.bfloat16).model)
    monkeypatch.setattr(models.quantize, "STREAMED_WEIGHT_BYTES", 0)
    model = load_model(llava_dir, dtype=torch.bfloat16).model
    lm_head = model.lm_head  # type: ignore[attr-defined]
    assert isinstance(lm_head, PackedWeight) and lm_head.plain is None
    assert isinstance(model.layers[0].w.qkv_weight, PackedWeight)  # type: ignore[attr-defined]
    assert relative_error(_llava_logits(model), plain) < 1e-2


def test_dtype_names(llama_dir: Path) -> None:
    assert load_model(llama_dir, dtype="bfloat16").info.dtype == torch.bfloat16
    assert load_model(llama_dir, "cpu", "auto").info.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(llama_dir, dtype="float8")


# --- broken folders: one clear ModelLoadError naming the file and the problem ---------------


def _expect_error(folder: Path, *fragments: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_model(folder)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


def test_not_a_directory(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nowhere", "nowhere", "not a directory")


def test_missing_config(llama_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(llama_dir)
    (folder / "config.json").unlink()
    _expect_error(folder, "config.json", "missing")


def test_unknown_architecture(llama_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(llama_dir)
    _edit_json(folder / "config.json", architectures=["BertForMaskedLM"])
    _expect_error(
        folder,
        "config.json",
        "unsupported architecture (BertForMaskedLM)",
        "LlavaForConditionalGeneration",
        "GPT2LMHeadModel",
    )


def test_missing_weights(llama_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(llama_dir)
    (folder / "model.safetensors").unlink()
    _expect_error(folder, "no model.safetensors or model.safetensors.index.json")


def test_missing_shard(sharded_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(sharded_dir)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    _expect_error(folder, shard.name, "missing")


def test_corrupt_weights_file(llama_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(llama_dir)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _expect_error(folder, "model.safetensors", "unreadable safetensors")


def test_shape_mismatch(llama_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(llama_dir)
    _edit_json(folder / "config.json", intermediate_size=96)
    _expect_error(folder, "model.safetensors", "gate_proj.weight", "(128, 64)", "(96, 64)")


def test_missing_tensor(sharded_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(sharded_dir)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"

    def remove(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[name]

    _edit_tensors(folder / index["weight_map"][name], remove)
    _expect_error(folder, index["weight_map"][name], name)


def test_extra_tensor(llama_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(llama_dir)

    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)

    _edit_tensors(folder / "model.safetensors", add)
    _expect_error(folder, "unexpected tensors", "model.layers.9.mlp.up_proj.weight")


def test_untied_head_missing(tmp_path: Path) -> None:
    folder = make_tiny_gpt2(tmp_path / "gpt2")
    _edit_json(folder / "config.json", tie_word_embeddings=False)
    _expect_error(folder, "missing tensor 'lm_head.weight'")


def test_missing_tokenizer(llama_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(llama_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    _expect_error(folder, "no tokenizer files")


def test_missing_image_processor(llava_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(llava_dir)
    (folder / "processor_config.json").unlink()
    _expect_error(folder, "image processor")


def test_image_seq_length_disagrees_with_tower(
    llava_dir: Path, broken: Callable[[Path], Path]
) -> None:
    folder = broken(llava_dir)
    _edit_json(folder / "config.json", image_seq_length=17)
    _expect_error(folder, "config.json", "image_seq_length is 17", "gives 16")


def test_unsupported_rope_type(llama_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(llama_dir)
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    _edit_json(folder / "config.json", rope_parameters=rope)
    _expect_error(folder, "rope type 'dynamic' unsupported")


def test_invalid_config_json(llama_dir: Path, broken: Callable[[Path], Path]) -> None:
    folder = broken(llama_dir)
    (folder / "config.json").write_text("{ not json")
    _expect_error(folder, "config.json", "invalid JSON")


@pytest.mark.parametrize("layout", ["processor_config", "preprocessor_config"])
def test_an_image_processor_gated_on_torchvision_falls_back_to_the_class_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """Some transformers versions gate AutoImageProcessor itself on torchvision; the
    class the checkpoint names must then preprocess exactly as the Auto class would."""
    folder = make_tiny_llava(tmp_path / "llava")
    if layout == "preprocessor_config":  # the older layout, as the shipped model has
        settings = json.loads((folder / "processor_config.json").read_text())["image_processor"]
        (folder / "preprocessor_config.json").write_text(json.dumps(settings))
        (folder / "processor_config.json").unlink()
    expected = checkpoint.load_image_processor(folder)

    class Gated:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> None:
            raise ImportError("AutoImageProcessor requires the Torchvision library")

    monkeypatch.setattr(checkpoint, "AutoImageProcessor", Gated)
    fallback = checkpoint.load_image_processor(folder)
    image = Image.fromarray(
        torch.randint(0, 256, (40, 56, 3), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
    )
    pixels = fallback(image, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels, expected(image, return_tensors="pt").pixel_values)
