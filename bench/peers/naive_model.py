"""The naive baseline's model side: transformers' `generate()`, one request at a time.

This is the code a first serving attempt usually has: load with the Auto
classes, build inputs with the tokenizer or processor, call `generate()` under a
lock with a streamer that hands each new token id to the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class GenerationRequest:
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, pixel_values for images
    max_tokens: int
    temperature: float
    top_p: float
    ignore_eos: bool
    seed: int | None

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])


class TokenQueueStreamer(BaseStreamer):
    """Skips the prompt, then posts every generated token id (None at the end) to a loop queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int | None]) -> None:
        self.loop = loop
        self.queue = queue
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, int(token_id))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class NaiveGenerator:
    """One model, one lock: requests run strictly one after another."""

    def __init__(self, model_path: str, dtype: str = "auto", device: str = "cpu") -> None:
        config = json.loads((Path(model_path) / "config.json").read_text())
        self.is_multimodal = "vision_config" in config
        torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
        model_class = AutoModelForImageTextToText if self.is_multimodal else AutoModelForCausalLM
        self.device = torch.device(device)
        model: Any = model_class.from_pretrained(model_path, dtype=torch_dtype)
        self.model = model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_path) if self.is_multimodal else None
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.name = Path(model_path).name
        self.lock = threading.Lock()

    def completion_inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(prompt, return_tensors="pt"))

    def chat_inputs(self, messages: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images: list[Image.Image] = []
        converted = [_convert_message(message, images) for message in messages]
        if self.processor is None:
            converted = [_text_only(message) for message in converted]
            encoded: Any = self.tokenizer.apply_chat_template(
                converted, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            return dict(encoded)
        text = self.processor.apply_chat_template(converted, add_generation_prompt=True)
        return dict(self.processor(text=text, images=images or None, return_tensors="pt"))

    def generate(self, request: GenerationRequest, streamer: BaseStreamer) -> None:
        """Blocking; run it in a worker thread."""
        options: dict[str, Any] = {"max_new_tokens": request.max_tokens, "streamer": streamer}
        options["do_sample"] = request.temperature > 0
        if request.temperature > 0:
            options |= {"temperature": request.temperature, "top_p": request.top_p}
        if request.ignore_eos:
            options["min_new_tokens"] = request.max_tokens
        with self.lock, torch.inference_mode():
            if request.seed is not None:
                torch.manual_seed(request.seed)
            inputs = {name: tensor.to(self.device) for name, tensor in request.inputs.items()}
            self.model.generate(**inputs, **options)

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))


def _convert_message(message: dict[str, Any], images: list[Image.Image]) -> dict[str, Any]:
    """OpenAI content parts -> chat-template parts; data-URL images are decoded into `images`."""
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": [{"type": "text", "text": content}]}
    parts: list[dict[str, Any]] = []
    for part in content or []:
        if part.get("type") == "image_url":
            images.append(_decode_data_url(part["image_url"]["url"]))
            parts.append({"type": "image"})
        else:
            parts.append({"type": "text", "text": part.get("text", "")})
    return {"role": message["role"], "content": parts}


def _text_only(message: dict[str, Any]) -> dict[str, Any]:
    """Text models' chat templates expect a plain string as content."""
    text = "".join(part.get("text", "") for part in message["content"])
    return {"role": message["role"], "content": text}


def _decode_data_url(url: str) -> Image.Image:
    encoded = url.split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")
