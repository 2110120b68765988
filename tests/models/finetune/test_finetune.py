"""A few steps on tiny checkpoints: the loss falls, and peft loads what was written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors import safe_open

from models.finetune import DataError, FinetuneConfig, finetune
from models.finetune.lora import add_lora, load_base_model, load_prompt_format
from models.finetune.run import load_examples
from models.finetune.train import evaluate
from tests.checkpoints import make_tiny_gpt2
from tests.models.finetune.conftest import WriteJsonl, data_url, image_chat, picture, text_chat

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}


def _image_data(tmp_path: Path, write_jsonl: WriteJsonl) -> Path:
    records = [
        image_chat("what colour is this?", data_url(picture(rgb)), name)
        for name, rgb in COLOURS.items()
    ]
    return write_jsonl(tmp_path / "train.jsonl", records)


def _config(model: Path, data: Path, out: Path, **overrides: object) -> FinetuneConfig:
    fields: dict[str, object] = dict(
        model=model, data=data, eval_data=data, out=out, rank=4, learning_rate=1e-2,
        batch_size=3, epochs=10, seed=0, progress=False,
    )  # fmt: skip
    return FinetuneConfig(**(fields | overrides))  # type: ignore[arg-type]


def test_llava_learns_and_peft_loads_the_adapter(
    tiny_llava: Path, tmp_path: Path, write_jsonl: WriteJsonl
) -> None:
    data, out = _image_data(tmp_path, write_jsonl), tmp_path / "adapter"
    metrics = finetune(_config(tiny_llava, data, out))
    first, last = metrics["epochs"][0], metrics["epochs"][-1]
    assert metrics["steps"] == 10 and last["step"] == 10
    assert last["eval_loss"] < 0.6 * first["eval_loss"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    with Image.open(out / "loss_curve.png") as curve:
        assert curve.format == "PNG" and curve.size[0] > 100
    reloaded = PeftModel.from_pretrained(load_base_model(tiny_llava, "cpu"), str(out))
    (examples,) = load_examples(load_prompt_format(tiny_llava), [data])
    result = evaluate(reloaded, examples, batch_size=3, pad_id=0)
    assert result.loss == pytest.approx(last["eval_loss"], rel=1e-4)
    assert result.exact_match == last["eval_exact_match"]


def test_only_the_decoder_is_adapted_unless_the_projector_is_asked_for(tiny_llava: Path) -> None:
    def adapted(**overrides: object) -> set[str]:
        config = _config(tiny_llava, tiny_llava, tiny_llava, **overrides)
        model = add_lora(load_base_model(tiny_llava, "cpu"), config)
        return {name for name, _ in model.named_modules() if name.endswith(".lora_A")}

    default = adapted()
    assert default and all(".language_model." in name for name in default)
    assert {name.split(".")[-2] for name in default} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip
    chosen = adapted(target_modules=("q_proj", "v_proj"), train_projector=True)
    assert {name.split(".")[-2] for name in chosen} == {"q_proj", "v_proj", "linear_1", "linear_2"}
    assert not any("vision_tower" in name for name in chosen)
    with pytest.raises(ValueError, match="unknown target modules fc1"):
        adapted(target_modules=("fc1",))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_text_models_learn(
    kind: str, tiny_llama: Path, tmp_path: Path, write_jsonl: WriteJsonl
) -> None:
    model = tiny_llama if kind == "llama" else make_tiny_gpt2(tmp_path / "gpt2")
    records = [text_chat(f"say {word}", word) for word in ("red", "circle", "three")]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    metrics = finetune(_config(model, data, tmp_path / "adapter", max_steps=8))
    assert metrics["steps"] == 8
    assert metrics["epochs"][-1]["eval_loss"] < 0.7 * metrics["epochs"][0]["eval_loss"]
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        trained = [torch.count_nonzero(weights.get_tensor(n)) for n in names if "lora_B" in n]
    assert names and all("lora_" in name for name in names)
    assert trained and all(trained)  # lora_B starts at zero


def test_bad_data_stops_the_run_before_any_training(
    tiny_llava: Path, tmp_path: Path, write_jsonl: WriteJsonl
) -> None:
    data = _image_data(tmp_path, write_jsonl)
    broken = write_jsonl(tmp_path / "eval.jsonl", [text_chat("q", "a"), "[1, 2"])
    out = tmp_path / "adapter"
    with pytest.raises(DataError) as raised:
        finetune(_config(tiny_llava, data, out, eval_data=broken))
    assert raised.value.problems == [
        "eval.jsonl:2: not JSON (Expecting ',' delimiter: line 1 column 6 (char 5))"
    ]
    assert not out.exists()
