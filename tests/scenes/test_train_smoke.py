import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from models.scenes import sample
from models.scenes.data import image_batch
from models.scenes.metrics import TaskAccuracy
from models.scenes.train import Trainer, parse_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, list[float]]:
    out = tmp_path_factory.mktemp("tiny")
    argv = ["--out", str(out), "--tiny", "--text-steps", "3", "--image-steps", "6"]
    trainer = Trainer(
        parse_args(
            [*argv, "--batch-size", "4", "--text-rows", "1", "--warmup", "2", "--lr", "3e-3"]
        )
    )
    accuracy = TaskAccuracy(window=10)
    losses = [trainer.train_step(step, accuracy) for step in range(9)]
    trainer.save()
    return trainer, losses


def test_loss_falls(trained: tuple[Trainer, list[float]]) -> None:
    _, losses = trained
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[2] < losses[0]
    assert losses[-1] < losses[3]


def test_each_answer_weighs_the_same(trained: tuple[Trainer, list[float]]) -> None:
    trainer, _ = trained
    batch = image_batch(trainer.tokenizer, trainer.processor, range(4), 16)
    num_answers = sum(len(spans) for spans in batch.answers)
    assert torch.isclose(batch.weights.sum(), torch.tensor(1.0))
    for row, spans in enumerate(batch.answers):
        for _, first, end in spans:
            answer_weight = batch.weights[row, first:end].sum()
            assert torch.isclose(answer_weight, torch.tensor(1.0 / num_answers))


def test_checkpoint_loads_with_transformers_and_generates(
    trained: tuple[Trainer, list[float]],
) -> None:
    out = trained[0].recipe.out
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    settings = json.loads((out / "mmgpt.json").read_text())
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": settings["caption_prompt"]}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        images=[sample(1).image], text=[prompt], add_special_tokens=False, return_tensors="pt"
    )
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens == model.config.image_seq_length == 16
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_checkpoint_files(trained: tuple[Trainer, list[float]]) -> None:
    out: Path = trained[0].recipe.out
    generation = json.loads((out / "generation_config.json").read_text())
    tokenizer = trained[0].tokenizer
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation["bos_token_id"] == tokenizer.bos_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (out / name).exists()
