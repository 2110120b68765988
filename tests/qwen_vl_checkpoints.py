"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints, built offline for tests.

The folder holds what a downloaded one does: config.json, safetensors weights, a
byte-level BPE tokenizer with the family's special tokens and a Qwen-style chat
template, generation_config.json, and the image processor's settings. Patches are
4 pixels and merge 2x2, so an image side is rounded to a multiple of 8 and a token
stands for 8x8 pixels; the pixel bounds keep images between 4 and 64 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tests.checkpoints import VOCAB_SIZE, _randomise, _save, _training_lines

PAD, END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
SPECIALS = [END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>"]
PATCH, MERGE, TEMPORAL = 4, 2, 2
TOKEN_PIXELS = (PATCH * MERGE) ** 2  # pixels one merged token stands for
MIN_PIXELS, MAX_PIXELS = 4 * TOKEN_PIXELS, 64 * TOKEN_PIXELS
Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
FAMILIES: tuple[Family, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
MODEL_CLASSES: dict[str, tuple[type[Any], type[PreTrainedModel]]] = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE_PAD},
    )


def image_processor(family: Family = "qwen2_vl") -> Qwen2VLImageProcessorPil:
    # Qwen3-VL's processor normalises with mean and std 0.5, the others with CLIP's
    normalise: dict[str, Any] = {}
    if family == "qwen3_vl":
        normalise = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        **normalise,
    )


def _text_config(tokenizer: PreTrainedTokenizerFast, family: Family) -> dict[str, Any]:
    if family == "qwen3_vl":  # QK-norm, interleaved M-RoPE, one layer past DeepStack's two
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}
        return _qwen2_text_config(tokenizer) | dict(
            num_hidden_layers=3,
            head_dim=16,
            rope_parameters=rope | {"mrope_interleaved": True},
        )
    return _qwen2_text_config(tokenizer)


def _qwen2_text_config(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def _vision_config(family: str) -> dict[str, Any]:
    common = dict(
        depth=2,
        num_heads=4,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
    )
    if family == "qwen2_vl":
        return common | dict(embed_dim=32, hidden_size=64, mlp_ratio=2)
    if family == "qwen3_vl":  # an 8x8 learned position grid, DeepStack from blocks 0 and 1
        return common | dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        )
    # window attention over 2x2 merged tokens in block 0, full attention in block 1
    return common | dict(
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=64,
        window_size=2 * PATCH * MERGE,
        fullatt_block_indexes=[1],
    )


def make_tiny_qwen_vl(
    out_dir: str | Path, *, family: Family = "qwen2_vl", seed: int = 0, tied: bool = False
) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    ids = {name: int(tokenizer.convert_tokens_to_ids(name)) for name in SPECIALS}  # type: ignore[arg-type]
    parts: dict[str, Any] = dict(
        text_config=_text_config(tokenizer, family),
        vision_config=_vision_config(family),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=tied,
    )
    config_class, model_class = MODEL_CLASSES[family]
    model = model_class(config_class(**parts))
    _randomise(model, seed)
    out = _save(model, tokenizer, Path(out_dir))
    image_processor(family).save_pretrained(out)
    return out
