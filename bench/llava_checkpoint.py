"""A random LLaVA-shaped checkpoint whose vision tower costs what a real one costs.

    python -m bench.llava_checkpoint /tmp/mmgpt-bench/llava-base

A CLIP ViT-B/16 tower at 224 pixels (86M parameters, 196 image tokens) feeds a
Llama-shaped decoder (hidden 512, 8 layers, 8,192-token byte-level BPE). The
shipped scenes model's tower is so small (3 layers, 64 tokens) that its
time-to-first-token is all HTTP and Python; this one shows what the image and
prefix caches save when encoding and prefilling an image is the real cost.
The chat template puts an image before the text of its turn, as LLaVA's does.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from bench.checkpoints import END_OF_TEXT, build_gpt2_tokenizer, save_checkpoint

IMAGE_TOKEN = "<image>"
VOCAB_SIZE = 8192
IMAGE_SIZE, PATCH_SIZE = 224, 16
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_llava(out_dir: str | Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_gpt2_tokenizer(VOCAB_SIZE)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    eos = _token_id(tokenizer, END_OF_TEXT)
    vision = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=512,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=_token_id(tokenizer, IMAGE_TOKEN),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,  # the CLS row is dropped ("default")
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    out = save_checkpoint(LlavaForConditionalGeneration(config), tokenizer, eos, out_dir)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(out)
    return out


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int)
    return token_id


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random LLaVA-shaped checkpoint.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_llava(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
