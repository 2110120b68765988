"""A random SmolVLM-256M-shaped checkpoint for the image-chat comparison, built offline.

    python -m bench.smolvlm_checkpoint /tmp/mmgpt-bench/smolvlm-256m --size 256m
    python -m bench.smolvlm_checkpoint /tmp/mmgpt-bench/smolvlm-tiny --size tiny

`256m` is SmolVLM-256M-Instruct's shape throughout: a SigLIP tower of 12 blocks of
768 (16-pixel patches over 512-pixel tiles), the pixel-shuffle connector with
scale factor 4 (64 tokens per tile), a SmolLM2-135M-shaped decoder (30 layers of
576, 9 query and 3 key/value heads, MLP 1,536, untied output layer) over 49,280
embedding rows; the image processor splits an image into 512-pixel tiles plus a
downscaled global image, and the chat template is SmolVLM's. The tokenizer is a
byte-level BPE of SmolLM2's size (49,152) followed by SmolVLM's image tokens
(`<global-img>`, `<row_r_col_c>`, `<fake_token_around_image>`, `<image>`,
`<end_of_utterance>`), whose ids are not the real ones. `tiny` is the same layout
with a few thousand parameters per layer and 64-pixel tiles (4 tokens each).
Weights are spread as in bench.qwen_vl_checkpoint, for the same reason.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from bench.checkpoints import (
    END_OF_TEXT,
    build_gpt2_tokenizer,
    decoder_sizes,
    save_multimodal,
    sized_main,
    spread_weights,
)

GRID = 6  # row/column tokens for up to 6x6 tiles
IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN = (
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
)
END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_TOKENS = (
    GLOBAL_IMAGE_TOKEN,
    *(f"<row_{row}_col_{col}>" for row in range(1, GRID + 1) for col in range(1, GRID + 1)),
    FAKE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    END_OF_UTTERANCE,
)
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class SmolVLMShape:
    tile: int  # pixels per side of a tile (the tower's image_size)
    patch: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    text_width: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_mlp: int
    regular_tokens: int
    embedding_rows: int

    @property
    def tokens_per_tile(self) -> int:
        return (self.tile // self.patch) ** 2 // SCALE_FACTOR**2


SCALE_FACTOR = 4
SHAPES = {
    "256m": SmolVLMShape(512, 16, 768, 12, 12, 3072, 576, 30, 9, 3, 1536, 49_152, 49_280),
    "tiny": SmolVLMShape(64, 8, 32, 2, 2, 64, 64, 2, 4, 2, 128, 1_024, 1_088),
}


def build_smolvlm_tokenizer(regular_tokens: int) -> PreTrainedTokenizerFast:
    tokenizer = build_gpt2_tokenizer(regular_tokens)
    specials = ["<|im_start|>", *IMAGE_TOKENS]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token = END_OF_UTTERANCE
    tokenizer.pad_token = END_OF_TEXT
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def image_processor(shape: SmolVLMShape) -> SmolVLMImageProcessorPil:
    """SmolVLM's: up to 4 tiles a side plus the global image, mean and std 0.5."""
    return SmolVLMImageProcessorPil(
        size={"longest_edge": 4 * shape.tile},
        max_image_size={"longest_edge": shape.tile},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def smolvlm_config(shape: SmolVLMShape, token_ids: dict[str, int]) -> SmolVLMConfig:
    vision = dict(
        hidden_size=shape.vision_width,
        intermediate_size=shape.vision_mlp,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.tile,
        patch_size=shape.patch,
    )
    text: dict[str, Any] = decoder_sizes(shape) | dict(
        model_type="llama",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
        tie_word_embeddings=False,
        eos_token_id=token_ids[END_OF_UTTERANCE],
        pad_token_id=token_ids[END_OF_TEXT],
        bos_token_id=token_ids["<|im_start|>"],
    )
    parts: dict[str, Any] = dict(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids[IMAGE_TOKEN],
        scale_factor=SCALE_FACTOR,
        tie_word_embeddings=False,
        pad_token_id=token_ids[END_OF_TEXT],  # read from the keyword arguments, untyped
    )
    return SmolVLMConfig(**parts)


def make_smolvlm(out_dir: str | Path, size: str = "256m", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    shape = SHAPES[size]
    tokenizer = build_smolvlm_tokenizer(shape.regular_tokens)
    names = (END_OF_TEXT, "<|im_start|>", *IMAGE_TOKENS)
    token_ids = {name: int(tokenizer.convert_tokens_to_ids(name)) for name in names}  # type: ignore[arg-type]
    model = SmolVLMForConditionalGeneration(smolvlm_config(shape, token_ids)).eval()
    spread_weights(model, seed)
    generation = GenerationConfig(
        bos_token_id=token_ids["<|im_start|>"],
        eos_token_id=token_ids[END_OF_UTTERANCE],
        pad_token_id=token_ids[END_OF_TEXT],
    )
    out = save_multimodal(model, tokenizer, image_processor(shape), generation, out_dir)
    # the processor's own setting (SmolVLMProcessor.save_pretrained would need its video
    # processor, so torchvision); no processor_class: AutoProcessor picks it by config
    processor = {"image_seq_len": shape.tokens_per_tile}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    description = "Write a random SmolVLM-256M-shaped checkpoint."
    sized_main(description, list(SHAPES), "256m", make_smolvlm, argv)


if __name__ == "__main__":
    main()
