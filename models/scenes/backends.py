"""Where evaluation answers come from: transformers' reference model or an mmgpt server."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Protocol

import httpx
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

MAX_NEW_TOKENS = 48


@dataclass(frozen=True)
class Request:
    task: str
    image: Image.Image
    question: str | None  # None asks for a caption
    expected: str


class Backend(Protocol):
    def answer(self, requests: list[Request]) -> list[str]: ...


def caption_prompt(model_dir: Path) -> str:
    settings = model_dir / "mmgpt.json"
    if not settings.exists():
        return "Describe the image."
    return str(json.loads(settings.read_text())["caption_prompt"])


class TransformersBackend:
    """Greedy `generate()` on left-padded batches of one task at a time."""

    def __init__(
        self, model_dir: Path, batch_size: int = 64, threads: int = 1, adapter: Path | None = None
    ) -> None:
        torch.set_num_threads(threads)
        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
        if adapter is not None:  # a LoRA adapter from `mmgpt finetune`, applied by peft itself
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(adapter)).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.caption_prompt = caption_prompt(model_dir)
        self.batch_size = batch_size

    def prompt(self, request: Request) -> str:
        text = request.question if request.question is not None else self.caption_prompt
        content = [{"type": "image"}, {"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return str(
            self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )

    @torch.inference_mode()
    def generate(self, requests: list[Request]) -> list[str]:
        inputs = self.processor(
            images=[request.image for request in requests],
            text=[self.prompt(request) for request in requests],
            padding=True,
            add_special_tokens=False,  # the chat template already starts with BOS
            return_tensors="pt",
        )
        output = self.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # [B, generated]
        return list(self.processor.batch_decode(new_tokens, skip_special_tokens=True))

    def answer(self, requests: list[Request]) -> list[str]:
        order = sorted(range(len(requests)), key=lambda index: requests[index].task)
        answers: dict[int, str] = {}
        for _, group in groupby(order, key=lambda index: requests[index].task):
            indices = list(group)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self.generate([requests[index] for index in chunk])
                answers.update(zip(chunk, texts, strict=True))
        return [answers[index] for index in range(len(requests))]


class ServerBackend:
    """POST /v1/caption and /v1/qa of a running server, `concurrency` requests at a time;
    `model` names the served model or one of its LoRA adapters (None: the server's own)."""

    def __init__(
        self,
        base_url: str,
        concurrency: int = 16,
        timeout: float = 120.0,
        model: str | None = None,
    ) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=timeout)
        self.concurrency = concurrency
        self.model = model

    def ask(self, request: Request) -> str:
        buffer = io.BytesIO()
        request.image.save(buffer, format="PNG")
        files = {"image": ("scene.png", buffer.getvalue(), "image/png")}
        fields = {"temperature": "0", "max_tokens": str(MAX_NEW_TOKENS)}
        if self.model is not None:
            fields["model"] = self.model
        route = "/v1/caption"
        if request.question is not None:
            fields["question"] = request.question
            route = "/v1/qa"
        response = self.client.post(route, files=files, data=fields)
        response.raise_for_status()
        return str(response.json()["choices"][0]["text"])

    def answer(self, requests: list[Request]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.ask, requests))
