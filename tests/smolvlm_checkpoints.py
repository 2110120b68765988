"""Tiny random SmolVLM / Idefics3 checkpoints, built offline for tests.

The folder holds what a downloaded one does: config.json, safetensors weights, a
byte-level BPE tokenizer with the family's special tokens (the image, its fake
surrounding token, the global-image tag and the row/column tags of the tiles), the
family's chat template, generation_config.json and processor_config.json (the image
processor's settings and `image_seq_len`). Tiles are 32 pixels of 8-pixel patches,
pixel-shuffled 2x2: 4 image tokens a tile; an image's longer side is resized to 96, so
it becomes up to 3x3 tiles plus the global image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)

from tests.checkpoints import VOCAB_SIZE, _randomise, _save, _training_lines, llama_config

Family = Literal["smolvlm", "idefics3"]
END_OF_TEXT, IM_START, END_OF_UTTERANCE = "<|endoftext|>", "<|im_start|>", "<end_of_utterance>"
FAKE_TOKEN, IMAGE, GLOBAL_IMAGE = "<fake_token_around_image>", "<image>", "<global-img>"
TILE_TAGS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SPECIALS = [END_OF_TEXT, IM_START, END_OF_UTTERANCE, FAKE_TOKEN, IMAGE, GLOBAL_IMAGE, *TILE_TAGS]
TILE, PATCH, SCALE = 32, 8, 2
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // SCALE**2
LONGEST_EDGE = 3 * TILE

# The template SmolVLM's checkpoints ship, with plain-string contents allowed.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """transformers' SmolVLM processor without its video processor (which needs torchvision)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]

    def __init__(
        self, image_processor: Any, tokenizer: Any, image_seq_len: int = 169, **kwargs: Any
    ) -> None:
        super().__init__(image_processor, tokenizer, None, image_seq_len, **kwargs)


def build_smolvlm_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE + len(SPECIALS),
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=IM_START,
        eos_token=END_OF_UTTERANCE,
        pad_token=END_OF_TEXT,
        chat_template=CHAT_TEMPLATE,
    )


def image_processor(family: Family) -> Any:
    processor_class = SmolVLMImageProcessorPil if family == "smolvlm" else Idefics3ImageProcessorPil
    return processor_class(
        size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE}
    )


def reference_processor(folder: Path, family: Family) -> Any:
    """transformers' own processor of the saved folder: AutoProcessor's for Idefics3; SmolVLM's
    AutoProcessor would also build a video processor, which needs torchvision."""
    if family == "smolvlm":
        return ImageOnlySmolVLMProcessor.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, Idefics3Processor)
    return processor


def _config(family: Family, tokenizer: PreTrainedTokenizerFast) -> Any:
    text = llama_config(tokenizer, max_position_embeddings=1024).to_dict()
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TILE,
        patch_size=PATCH,
    )
    config_class = SmolVLMConfig if family == "smolvlm" else Idefics3Config
    return config_class(
        text_config=text,
        vision_config=vision,
        scale_factor=SCALE,
        image_token_id=int(tokenizer.convert_tokens_to_ids(IMAGE)),  # type: ignore[arg-type]
        tie_word_embeddings=False,
    )


def make_tiny_smolvlm(out_dir: str | Path, *, family: Family = "smolvlm", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_smolvlm_tokenizer()
    config = _config(family, tokenizer)
    model: PreTrainedModel = (
        SmolVLMForConditionalGeneration(config)
        if family == "smolvlm"
        else Idefics3ForConditionalGeneration(config)
    )
    _randomise(model, seed)
    out = _save(model, tokenizer, Path(out_dir))
    processor_class = ImageOnlySmolVLMProcessor if family == "smolvlm" else Idefics3Processor
    processor = processor_class(
        image_processor=image_processor(family),
        tokenizer=tokenizer,
        image_seq_len=TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out
