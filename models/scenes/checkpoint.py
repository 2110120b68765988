"""Writing a trained model as a Hugging Face LLaVA folder that mmgpt and transformers load."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import (
    GenerationConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from models.scenes.config import image_processor
from models.scenes.tokenizer import CAPTION_PROMPT


def build_processor(tokenizer: PreTrainedTokenizerFast, patch_size: int) -> LlavaProcessor:
    """CLIP's 'default' strategy drops the CLS token: one token per patch per image."""
    return LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=48,
    )


def save_checkpoint(
    model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, out: Path
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out)
    patch_size = int(model.config.vision_config.patch_size)  # type: ignore[union-attr]
    processor = build_processor(tokenizer, patch_size)
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json, for older loaders
    (out / "mmgpt.json").write_text(json.dumps({"caption_prompt": CAPTION_PROMPT}, indent=2) + "\n")
