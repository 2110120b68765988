"""Gemma 3 requests built two ways: through mmgpt's own path (media, prompts, spans) and
through transformers' Gemma3Processor, whose `generate()` gives the expected greedy tokens
(its `token_type_ids` make image tokens attend both ways)."""

from __future__ import annotations

from transformers import AutoModelForImageTextToText, Gemma3Processor

from app.prompts import PromptBuilder
from models.base import LoadedModel
from tests.engine.qwen_vl_reference import QwenVLReference


class Gemma3Reference(QwenVLReference):
    """QwenVLReference's requests and generate(), with Gemma 3's processor in place of Qwen's."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.processor = Gemma3Processor(
            image_processor=loaded.image_processor,
            tokenizer=loaded.tokenizer,
            chat_template=loaded.chat_template,
            image_seq_length=loaded.info.image_seq_length,
        )
        self.prompts = PromptBuilder(loaded.tokenizer, loaded.info, loaded.chat_template)
        self.model = AutoModelForImageTextToText.from_pretrained(loaded.path).eval()
