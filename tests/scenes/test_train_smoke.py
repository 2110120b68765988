import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from models.scenes import sample
from models.scenes.data import image_batch
from models.scenes.metrics import TaskAccuracy, grounding_loss
from models.scenes.render import RGB
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


def test_each_answer_weighs_its_units_not_its_tokens(trained: tuple[Trainer, list[float]]) -> None:
    """A QA answer is one unit of loss, a caption `caption_units` per object it describes."""
    trainer, _ = trained
    seeds = range(40)
    batch = image_batch(trainer.tokenizer, trainer.processor, seeds, 16, caption_units=2.0)
    scenes = [sample(seed) for seed in seeds]
    units = [
        2.0 * len(scenes[row].objects) if task == "caption" else 1.0
        for row, spans in enumerate(batch.answers)
        for task, _, _ in spans
    ]
    assert {"caption", "colour"} <= {task for spans in batch.answers for task, _, _ in spans}
    assert torch.isclose(batch.weights.sum(), torch.tensor(1.0))
    weights = [
        float(batch.weights[row, first:end].sum())
        for row, spans in enumerate(batch.answers)
        for _, first, end in spans
    ]
    assert weights == pytest.approx([unit / sum(units) for unit in units])


def test_grounding_labels_name_the_object_under_each_patch(
    trained: tuple[Trainer, list[float]],
) -> None:
    """Image tokens whose 16-pixel patch is mostly covered by an object are labelled with its
    colour and shape words; background patches and text carry no label."""
    trainer, _ = trained
    tokenizer, seeds = trainer.tokenizer, range(100, 120)
    batch = image_batch(tokenizer, trainer.processor, seeds, 16)
    assert batch.patch_colour is not None and batch.patch_shape is not None
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    rows_labelled = 0
    for row, seed in enumerate(seeds):
        scene = sample(seed)
        first = batch.input_ids[row].tolist().index(image_id)
        labelled = (batch.patch_colour[row] != -100).nonzero().flatten().tolist()
        rows_labelled += bool(labelled)
        assert (batch.patch_shape[row] != -100).nonzero().flatten().tolist() == labelled
        for position in labelled:
            assert 0 <= position - first < 16
            top, left = divmod(position - first, 4)
            patch = scene.image.crop((left * 16, top * 16, (left + 1) * 16, (top + 1) * 16))
            colour = tokenizer.convert_ids_to_tokens(int(batch.patch_colour[row, position]))
            shape = tokenizer.convert_ids_to_tokens(int(batch.patch_shape[row, position]))
            named = [obj for obj in scene.objects if (obj.colour, obj.shape) == (colour, shape)]
            assert named, (scene.caption, colour, shape)
            assert RGB[colour] in {rgb for _, rgb in patch.getcolors(maxcolors=256) or []}
    # A small object can straddle four 16-pixel patches, a quarter of none of them.
    assert rows_labelled >= len(seeds) // 2


def test_grounding_loss_falls_when_trained_with_it(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path), "--tiny", "--text-steps", "0", "--image-steps", "8"]
    flags = ["--batch-size", "8", "--text-rows", "1", "--warmup", "1", "--lr", "1e-2"]
    trainer = Trainer(parse_args([*argv, *flags, "--grounding", "1.0"]))
    fixed = trainer.batch(0)

    def measured() -> float:
        with torch.no_grad():
            logits = trainer.model(
                input_ids=fixed.input_ids,
                attention_mask=fixed.attention_mask,
                pixel_values=fixed.pixel_values,
            ).logits
        return float(grounding_loss(logits, fixed))

    before = measured()
    accuracy = TaskAccuracy(window=10)
    for step in range(8):
        trainer.train_step(step, accuracy)
    assert measured() < before


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
