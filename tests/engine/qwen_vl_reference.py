"""Qwen-VL requests built two ways: through mmgpt's own path (media, prompts, spans) and
through transformers' processor, whose `generate()` gives the expected greedy tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from app.engine.sequence import ImageInput, SamplingParams
from app.engine.validation import image_spans
from app.media import preprocess
from app.prompts import Message, PromptBuilder
from models.base import LoadedModel
from tests.engine.drive import Job


class ImageOnlyProcessor(Qwen2VLProcessor):
    """transformers' Qwen2-VL processor without its video processor (which needs torchvision)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


class Qwen3ImageOnlyProcessor(Qwen3VLProcessor):
    """transformers' Qwen3-VL processor, likewise without its video processor."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def reference_processor(loaded: LoadedModel) -> Qwen2VLProcessor | Qwen3VLProcessor:
    """The family's own processor (Qwen2.5-VL reuses Qwen2-VL's) around the loaded parts."""
    qwen3 = loaded.info.architecture == "Qwen3VLForConditionalGeneration"
    processor_class = Qwen3ImageOnlyProcessor if qwen3 else ImageOnlyProcessor
    return processor_class(
        image_processor=loaded.image_processor,
        tokenizer=loaded.tokenizer,
        chat_template=loaded.chat_template,
    )


def picture(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def user_message(text: str, num_images: int) -> list[Message]:
    parts: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@dataclass
class Request:
    prompt: list[int]
    images: list[ImageInput]
    reference_inputs: dict[str, torch.Tensor]  # what transformers' processor made


class QwenVLReference:
    def __init__(self, loaded: LoadedModel, processor: Any = None) -> None:
        """`processor`: transformers' processor of the family; the Qwen-VL one by default."""
        self.loaded = loaded
        self.processor = processor or reference_processor(loaded)
        self.prompts = PromptBuilder(loaded.tokenizer, loaded.info, loaded.chat_template)
        self.model = AutoModelForImageTextToText.from_pretrained(loaded.path).eval()

    def request(self, text: str, pictures: list[Image.Image], detail: str = "auto") -> Request:
        messages = user_message(text, len(pictures))
        images = [preprocess(p, self.loaded.image_processor, detail) for p in pictures]
        prompt = self.prompts.chat(messages, image_tokens=[image.placeholder for image in images])
        rendered = self.prompts._render(messages, "messages")
        inputs: dict[str, Any] = {"text": [rendered], "return_tensors": "pt"}
        if pictures:
            inputs["images"] = pictures
        return Request(prompt, images, dict(self.processor(**inputs)))

    def job(self, request: Request, params: SamplingParams) -> Job:
        return Job(
            request.prompt, params, image_spans(request.prompt, request.images, self.loaded.info)
        )

    @torch.no_grad()
    def generate(self, request: Request, max_new_tokens: int) -> list[int]:
        """Greedy tokens; like mmgpt's sampler, never the image placeholder token."""
        inputs = request.reference_inputs
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            suppress_tokens=[self.loaded.info.image_token_id],
        )
        return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]
