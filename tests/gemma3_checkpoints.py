"""Tiny random Gemma 3 checkpoints, built offline for tests.

The text model has four layers, local ones with an 8-token window around a global
one (`sliding_window_pattern` 3: local, local, global, local), so that prompts of a
few dozen tokens already attend differently in the two kinds; the global layers'
rotary embedding is linearly scaled and the local ones keep their own base, as in the
released checkpoints. The multimodal one adds a SigLIP tower over 32x32 images in 4-pixel
patches (an 8x8 grid) pooled to 16 tokens, a tokenizer with Gemma's image and turn tokens,
a Gemma-style chat template that writes <start_of_image> for an image, and the PIL image
processor and processor settings, so that transformers' Gemma3Processor runs on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from tests.checkpoints import _randomise, _save, build_tokenizer, byte_level_bpe

SLIDING_WINDOW = 8
IMAGE_SIZE, PATCH_SIZE, IMAGE_TOKENS = 32, 4, 16
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
BEGIN_IMAGE, END_IMAGE, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIALS = [PAD, BOS, EOS, "<start_of_turn>", "<end_of_turn>", BEGIN_IMAGE, END_IMAGE, IMAGE]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
ROPE_PARAMETERS = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
}


def _randomise_gemma(model: PreTrainedModel, seed: int) -> None:
    """Seeded weights; Gemma's RMSNorm weights are offsets from 1 (it scales by 1 + weight),
    so they are drawn around 0 as trained checkpoints hold them, not around 1."""
    _randomise(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight") and "vision_tower" not in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def gemma3_text_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> Gemma3TextConfig:
    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        query_pre_attn_scalar=20,
        sliding_window=SLIDING_WINDOW,
        sliding_window_pattern=3,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_parameters={kind: dict(params) for kind, params in ROPE_PARAMETERS.items()},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Gemma3TextConfig(**(fields | overrides))


def make_tiny_gemma3_text(out_dir: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A 4-layer Gemma3ForCausalLM; `overrides` go to Gemma3TextConfig."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(with_image_token=False)
    model = Gemma3ForCausalLM(gemma3_text_config(tokenizer, **overrides))
    _randomise_gemma(model, seed)
    return _save(model, tokenizer, Path(out_dir))


def build_gemma_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Gemma 3's special tokens under their names. It adds no BOS
    of its own: the chat template writes it, and the reference processor tokenises the
    rendered template with the tokenizer's defaults."""
    bpe = byte_level_bpe(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "image_token": IMAGE,
            "boi_token": BEGIN_IMAGE,
            "eoi_token": END_IMAGE,
        },
    )


def make_tiny_gemma3_vl(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Gemma3ForConditionalGeneration: SigLIP (8x8 patches pooled to 16 tokens) + the
    4-layer text model above, with its processor."""
    torch.manual_seed(seed)
    tokenizer = build_gemma_tokenizer()
    ids = {token: int(tokenizer.convert_tokens_to_ids(token)) for token in SPECIALS}  # type: ignore[arg-type]
    vision = SiglipVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = Gemma3Config(
        text_config=gemma3_text_config(tokenizer),
        vision_config=vision,
        mm_tokens_per_image=IMAGE_TOKENS,
        boi_token_index=ids[BEGIN_IMAGE],
        eoi_token_index=ids[END_IMAGE],
        image_token_index=ids[IMAGE],
    )
    model = Gemma3ForConditionalGeneration(config)
    _randomise_gemma(model, seed)
    out = _save(model, tokenizer, Path(out_dir))
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=IMAGE_TOKENS,
    ).save_pretrained(out)
    return out
