"""A random Qwen2.5-VL-shaped checkpoint for the image-chat comparison, built offline.

    python -m bench.qwen_vl_checkpoint /tmp/mmgpt-bench/qwen2.5-vl --size scaled
    python -m bench.qwen_vl_checkpoint /tmp/mmgpt-bench/qwen2.5-vl-tiny --size tiny

`scaled` keeps what decides an image's cost and token count real and scales the
depth: Qwen2.5-VL-3B's vision tower (width 1,280, 16 heads, MLP 3,420, 14-pixel
patches merged 2x2, 112-pixel attention windows) at 8 of its 32 blocks, full
attention in the last one as in every eighth of the real tower; Qwen2.5-0.5B's
decoder (24 layers of 896, 14 query and 2 key/value heads, MLP 4,864, tied
embeddings, 151,936 rows) with M-RoPE sections scaled to its 64-wide heads; the
real image processor settings (min/max pixels) and chat template; Qwen's special
tokens at their real ids over a byte-level BPE of Qwen's vocabulary size. The
whole model has about 0.66B parameters in float32. `tiny` is the same layout at a
few thousand parameters per layer, with the real image processor, for rehearsals
and tests. `2b` is the GPU run's (bench/gpu_suite.sh): Qwen2.5-VL-3B's whole vision
tower (32 blocks, full attention every eighth) before Qwen2.5-1.5B's decoder (28 layers
of 1,536, 12 query and 2 key/value heads, MLP 8,960), about 2B parameters, built and
saved in bfloat16.

Weights are seeded normal draws wider than the model's own initialisation (whose
logits are so flat that every prompt gets the same answer), so that outputs depend
on the image and the text and a difference between two servers shows. The
generation config stops at `<|im_end|>` or `<|endoftext|>`, as Qwen2.5-VL-Instruct's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from bench.checkpoints import (
    END_OF_TEXT,
    build_gpt2_tokenizer,
    decoder_sizes,
    default_dtype,
    save_multimodal,
    sized_main,
    spread_weights,
)

# Qwen2's special tokens in their order after the regular vocabulary (151,643 of them)
SPECIAL_TOKENS = (
    END_OF_TEXT,
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
PATCH, MERGE, TEMPORAL = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16_384  # Qwen2.5-VL's processor bounds

# Qwen2-VL's chat template: a default system turn, each image as vision_start, pad, vision_end
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class QwenVLShape:
    vision_depth: int
    vision_width: int
    vision_mlp: int
    vision_heads: int
    full_attention_blocks: tuple[int, ...]
    text_width: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_mlp: int
    mrope_section: tuple[int, int, int]  # sums to half the head width
    regular_tokens: int  # the BPE's vocabulary before the special tokens
    embedding_rows: int  # the embedding's rows (Qwen pads them past the tokenizer)
    bfloat16: bool = False  # built and saved in bfloat16 (half the memory for billions)


QWEN_VOCAB = (151_643, 151_936)  # regular tokens, embedding rows
SHAPES = {
    "scaled": QwenVLShape(8, 1280, 3420, 16, (7,), 896, 24, 14, 2, 4864, (8, 12, 12), *QWEN_VOCAB),
    "tiny": QwenVLShape(2, 32, 64, 2, (1,), 64, 2, 4, 2, 128, (2, 3, 3), 2_048, 2_112),
    "2b": QwenVLShape(
        32, 1280, 3420, 16, (7, 15, 23, 31), 1536, 28, 12, 2, 8960, (16, 24, 24), *QWEN_VOCAB, True
    ),
}


def build_qwen_tokenizer(regular_tokens: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `regular_tokens` ending in <|endoftext|>, then Qwen's other
    special tokens, so that each has Qwen's id when the vocabulary is Qwen's size."""
    tokenizer = build_gpt2_tokenizer(regular_tokens + 1)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = END_OF_TEXT
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def image_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )


def qwen_vl_config(shape: QwenVLShape, token_ids: dict[str, int]) -> Qwen2_5_VLConfig:
    vision = dict(
        depth=shape.vision_depth,
        hidden_size=shape.vision_width,
        intermediate_size=shape.vision_mlp,
        num_heads=shape.vision_heads,
        out_hidden_size=shape.text_width,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        window_size=112,
        fullatt_block_indexes=list(shape.full_attention_blocks),
    )
    rope = {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": list(shape.mrope_section),
    }
    text: dict[str, Any] = decoder_sizes(shape) | dict(
        max_position_embeddings=32_768,
        rms_norm_eps=1e-6,
        rope_parameters=rope,
        tie_word_embeddings=True,
        eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids[END_OF_TEXT],
        bos_token_id=token_ids[END_OF_TEXT],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids[IMAGE_PAD],
        video_token_id=token_ids[VIDEO_PAD],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def make_qwen_vl(out_dir: str | Path, size: str = "scaled", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    shape = SHAPES[size]
    tokenizer = build_qwen_tokenizer(shape.regular_tokens)
    token_ids = {token: int(tokenizer.convert_tokens_to_ids(token)) for token in SPECIAL_TOKENS}  # type: ignore[arg-type]
    dtype = torch.bfloat16 if shape.bfloat16 else torch.float32
    with default_dtype(dtype):
        model = Qwen2_5_VLForConditionalGeneration(qwen_vl_config(shape, token_ids)).eval()
    spread_weights(model, seed)
    end_of_text = token_ids[END_OF_TEXT]
    generation = GenerationConfig(
        bos_token_id=end_of_text,
        eos_token_id=[token_ids["<|im_end|>"], end_of_text],
        pad_token_id=end_of_text,
    )
    return save_multimodal(model, tokenizer, image_processor(), generation, out_dir)


def main(argv: Sequence[str] | None = None) -> None:
    description = "Write a random Qwen2.5-VL-shaped checkpoint."
    sized_main(description, list(SHAPES), "scaled", make_qwen_vl, argv)


if __name__ == "__main__":
    main()
