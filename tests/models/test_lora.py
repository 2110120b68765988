"""Per-row LoRA: rows of two adapters and of the base in one flat batch give peft's logits;
an adapter that does not fit the base is refused whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import models.lora.slots
from models import LoadedModel, load_model
from models.base import BASE_ADAPTER_SLOT as BASE_SLOT
from models.lora import LoraLoadError, LoraSlots, enable_lora
from tests.checkpoints import (
    make_tiny_gpt2,
    make_tiny_llama,
    make_tiny_llava,
    make_tiny_qwen2,
    make_tiny_qwen3,
)
from tests.gemma3_checkpoints import make_tiny_gemma3_text, make_tiny_gemma3_vl
from tests.lora_adapters import LLAVA_DECODER, PROJECTOR, make_adapter, peft_reference
from tests.models.paged import PagedSession, relative_error
from tests.qwen_vl_checkpoints import make_tiny_qwen_vl
from tests.smolvlm_checkpoints import make_tiny_smolvlm

TOLERANCE = 1e-4
PROMPTS = ([1, 5, 9, 30, 31, 17, 8, 200], [1, 44, 45, 46, 12], [1, 99, 3, 77, 150, 151, 6])


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), num_kv_heads=2)


@pytest.fixture(scope="module")
def llama_adapters(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(llama, root / "a", rank=3, targets=["q_proj", "v_proj", "down_proj"], seed=1),
        make_adapter(
            llama, root / "b", rank=5, targets=["k_proj", "o_proj", "gate_proj", "up_proj"],
            seed=2, use_rslora=True,
        ),
    ]  # fmt: skip


def _loaded(folder: Path, max_loras: int = 2, max_rank: int = 8) -> tuple[LoadedModel, LoraSlots]:
    loaded = load_model(folder)
    return loaded, enable_lora(loaded.model, max_loras, max_rank)


@pytest.mark.parametrize("stacked_max_rows", [0, 64], ids=["grouped", "stacked"])
def test_mixed_batch_matches_peft(
    llama: Path, llama_adapters: list[Path], stacked_max_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models.lora.slots, "STACKED_MAX_ROWS", stacked_max_rows)
    loaded, slots = _loaded(llama)
    slot_of = [-1] + [slots.load(path).slot for path in llama_adapters]
    session = PagedSession(loaded.model)
    # prefill in two chunks, the three sequences (base, adapter a, adapter b) side by side
    cut = 3
    for piece in (slice(0, cut), slice(cut, None)):
        work = [(i, list(prompt[piece])) for i, prompt in enumerate(PROMPTS)]
        slots.select([(slot_of[i], len(tokens)) for i, tokens in work])
        hidden = session.step(work)
    for i, adapter in enumerate([None, *llama_adapters]):
        reference = peft_reference(llama, adapter)
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([PROMPTS[i]])).logits[0, cut:]
        ours = loaded.model.compute_logits(hidden[i], row_major=True)
        assert relative_error(ours, expected) < TOLERANCE, i


# family -> (checkpoint factory, the decoder's module prefix where transformers loads it as
# an image-text model, whose vision tower has projections of the same names; None for text)
FAMILIES = {
    "qwen2": (make_tiny_qwen2, None),
    "qwen3": (make_tiny_qwen3, None),
    "qwen2_vl": (make_tiny_qwen_vl, "language_model"),
    "qwen2_5_vl": (lambda d: make_tiny_qwen_vl(d, family="qwen2_5_vl"), "language_model"),
    "qwen3_vl": (lambda d: make_tiny_qwen_vl(d, family="qwen3_vl"), "language_model"),
    "smolvlm": (make_tiny_smolvlm, "text_model"),
    "idefics3": (lambda d: make_tiny_smolvlm(d, family="idefics3"), "text_model"),
    "gemma3_text": (make_tiny_gemma3_text, None),
    "gemma3": (make_tiny_gemma3_vl, "language_model"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_llama_family_decoder(family: str, tmp_path: Path) -> None:
    make, decoder = FAMILIES[family]
    multimodal = decoder is not None
    base = make(tmp_path / "base")
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    if decoder is not None:  # anchored at the decoder: the tower has projections of these names
        anchored = LLAVA_DECODER.replace("language_model", decoder)
        targets = anchored.format("|".join(targets))  # type: ignore[assignment]
    adapter = make_adapter(
        base, tmp_path / "a", rank=3, targets=targets, seed=5, multimodal=multimodal
    )
    loaded, slots = _loaded(base)
    slot = slots.load(adapter).slot
    prompts = [list(PROMPTS[0]), list(PROMPTS[1])]
    session = PagedSession(loaded.model)
    slots.select([(BASE_SLOT, len(prompts[0])), (slot, len(prompts[1]))])
    attn_inputs, positions = session.attention_inputs(list(enumerate(prompts)))
    if loaded.info.position_sections > 1:
        positions = positions.expand(loaded.info.position_sections, -1)
    input_ids = torch.tensor([t for prompt in prompts for t in prompt])
    hidden = loaded.model.forward(input_ids, positions, attn_inputs, session.cache)
    for rows, prompt, folder in zip(
        hidden.split([len(p) for p in prompts]), prompts, [None, adapter], strict=True
    ):
        reference = peft_reference(base, folder, multimodal)
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([prompt])).logits[0]
        ours = loaded.model.compute_logits(rows, row_major=True)
        assert relative_error(ours, expected) < TOLERANCE, folder


def test_unload_clears_the_slot(llama: Path, llama_adapters: list[Path]) -> None:
    loaded, slots = _loaded(llama, max_loras=1)
    base = _last_logits(loaded, slots, -1)
    slot = slots.load(llama_adapters[0]).slot
    assert not torch.equal(_last_logits(loaded, slots, slot), base)
    slots.unload(slot)
    assert torch.equal(_last_logits(loaded, slots, slot), base)
    assert slots.load(llama_adapters[1]).slot == slot  # the slot is free again


def _last_logits(loaded: LoadedModel, slots: LoraSlots, slot: int) -> torch.Tensor:
    slots.select([(slot, len(PROMPTS[0]))])
    hidden = PagedSession(loaded.model).step([(0, list(PROMPTS[0]))])[0]
    return loaded.model.compute_logits(hidden[-1:], row_major=True)


def test_llava_decoder_and_projector(tmp_path: Path) -> None:
    base = make_tiny_llava(tmp_path / "base", vision="clip")
    targets = LLAVA_DECODER.format("q_proj|up_proj") + "|" + PROJECTOR
    adapter = make_adapter(base, tmp_path / "a", rank=4, targets=targets, seed=3, multimodal=True)
    loaded, slots = _loaded(base)
    loaded_adapter = slots.load(adapter)
    assert loaded_adapter.adapts_images
    info = loaded.info
    assert info.image_token_id is not None
    prompt = [1, 7, *[info.image_token_id] * info.image_seq_length, 40, 41, 42]
    pixels = torch.randn(1, 3, info.image_size, info.image_size, generator=torch.Generator())
    slots.select_all(loaded_adapter.slot)
    embeds = loaded.model.encode_images(pixels)[0]
    slots.select([(loaded_adapter.slot, len(prompt))])
    hidden = PagedSession(loaded.model).step([(0, prompt)], embeds)[0]
    reference = peft_reference(base, adapter, multimodal=True)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([prompt]), pixel_values=pixels).logits[0]
    ours = loaded.model.compute_logits(hidden, row_major=True)
    assert relative_error(ours, expected) < TOLERANCE


def test_the_vision_tower_is_refused(tmp_path: Path) -> None:
    base = make_tiny_llava(tmp_path / "base", vision="clip")
    adapter = make_adapter(
        base, tmp_path / "a", rank=2, targets=["q_proj"], seed=3, multimodal=True
    )
    _, slots = _loaded(base)
    with pytest.raises(LoraLoadError, match=r"adapts model\.vision_tower\..*cannot adapt"):
        slots.load(adapter)
    assert slots.num_free == 2


def test_int8_weights_take_adapters(llama: Path, llama_adapters: list[Path]) -> None:
    loaded = load_model(llama, quantization="int8")
    slots = enable_lora(loaded.model, 2, 8)
    base = _last_logits(loaded, slots, BASE_SLOT)
    slot = slots.load(llama_adapters[0]).slot
    adapted = _last_logits(loaded, slots, slot)
    reference = peft_reference(llama, llama_adapters[0])
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1:]
    assert relative_error(adapted, expected) < 0.05 < relative_error(base, expected)  # int8: ~2%
    assert torch.equal(_last_logits(loaded, slots, BASE_SLOT), base)


def _broken_copy(source: Path, tmp_path: Path, **config: object) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 16}, "exceeds the maximum LoRA rank 8"),
        ({"target_modules": ["q_proj", "fc9"]}, r"does not have: \['fc9'\]"),
        ({"r": 2}, "do not fit the base"),
        ({"use_dora": True}, "use_dora is not supported"),
    ],
)
def test_refused_whole(
    llama: Path, llama_adapters: list[Path], tmp_path: Path, change: dict, message: str
) -> None:
    loaded, slots = _loaded(llama)
    before = _last_logits(loaded, slots, 0)
    with pytest.raises(LoraLoadError, match=message):
        slots.load(_broken_copy(llama_adapters[0], tmp_path, **change))
    assert slots.num_free == 2
    assert all(not p.lora_a.any() and not p.lora_b.any() for p in slots.projections)
    assert torch.equal(_last_logits(loaded, slots, 0), before)


def test_module_the_base_lacks(llama: Path, tmp_path: Path) -> None:
    tensors_of_other = make_tiny_llama(tmp_path / "deeper", num_kv_heads=2, num_hidden_layers=4)
    adapter = make_adapter(tensors_of_other, tmp_path / "a", rank=2, targets=["q_proj"], seed=4)
    _, slots = _loaded(llama)
    lacking = r"adapts model\.layers\.2\.self_attn\.q_proj, which this base"
    with pytest.raises(LoraLoadError, match=lacking):
        slots.load(adapter)


def test_a_family_without_adapters_says_so(tmp_path: Path) -> None:
    loaded = load_model(make_tiny_gpt2(tmp_path / "gpt2"))
    with pytest.raises(LoraLoadError, match="LoRA is not served for GPT2LMHeadModel"):
        enable_lora(loaded.model, 2, 8)


def test_not_an_adapter(tmp_path: Path, llama: Path) -> None:
    _, slots = _loaded(llama)
    with pytest.raises(LoraLoadError, match="not a PEFT adapter folder"):
        slots.load(tmp_path)
