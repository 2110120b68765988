"""The request sets a benchmark sends: random text, scene captions, scene QA, image chat.

`chat-image-mixed` is image chat for native-resolution models: images of eight sizes
and aspect ratios (bench.images.MIXED_SIZES, whatever `--image-source` says), one per
request and two in every fourth.

Every workload is deterministic in its seed, so each contender of a comparison
receives exactly the same requests.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.images import CAPTION_PROMPT, ImageSource, image_source

Api = Literal["completions", "chat", "caption", "qa"]
WORKLOADS = ("text", "caption", "qa", "chat-image", "chat-image-mixed")
TWO_IMAGES_EVERY = 4  # chat-image-mixed: requests 3, 7, 11, ... carry two images
TWO_IMAGE_PROMPT = "What differs between the two images?"

# Plain ASCII words: a prefix of their tokens decodes back to the same text.
_WORD_TEXT = (
    "the a of and to in is on red blue green small large round square shape image near left "
    "right above below under over beside picture scene colour bright dark light three two "
    "one many few model server token stream batch cache block query answer question caption"
)
_WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class BenchRequest:
    """One request: JSON body (completions, chat) or form fields plus a PNG (caption, qa)."""

    api: Api
    fields: dict[str, Any]
    image_png: bytes | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    name: str = "text"
    num_prompts: int = 100
    input_len: int = 32
    output_len: int = 64
    seed: int = 0
    temperature: float = 0.0
    top_p: float = 1.0  # sent only below 1
    ignore_eos: bool = False
    image_source: str = "scenes"
    tokenizer: str | None = None  # folder or tokenizer.json, for exact text prompt lengths
    repeat_image: int = 1  # consecutive requests about one image, each asking something else
    extra_body: dict[str, Any] = field(default_factory=dict)


def build_requests(spec: WorkloadSpec) -> list[BenchRequest]:
    if spec.name == "text":
        return _text_requests(spec)
    if spec.name not in WORKLOADS:
        raise ValueError(f"unknown workload {spec.name!r}; choose from {', '.join(WORKLOADS)}")
    if spec.name == "chat-image-mixed":
        return _chat_image_mixed(spec, image_source("mixed", spec.seed))
    images = image_source(spec.image_source, spec.seed)
    builder = {"caption": _caption, "qa": _qa, "chat-image": _chat_image}[spec.name]
    return [builder(spec, images, index) for index in range(spec.num_prompts)]


def _sampling_fields(spec: WorkloadSpec) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "max_tokens": spec.output_len,
        "temperature": spec.temperature,
        "stream": True,
    }
    if spec.top_p < 1.0:
        fields["top_p"] = spec.top_p
    if spec.ignore_eos:
        fields["ignore_eos"] = True
    return fields | spec.extra_body


def _json_fields(spec: WorkloadSpec) -> dict[str, Any]:
    return _sampling_fields(spec) | {"stream_options": {"include_usage": True}}


def _text_requests(spec: WorkloadSpec) -> list[BenchRequest]:
    counter = TokenCounter(spec.tokenizer)
    rng = random.Random(spec.seed)
    prompts = [counter.prompt(rng, spec.input_len) for _ in range(spec.num_prompts)]
    return [BenchRequest("completions", _json_fields(spec) | {"prompt": p}) for p in prompts]


def _form_fields(spec: WorkloadSpec) -> dict[str, Any]:
    return _sampling_fields(spec) | {"stream_include_usage": True}


def _caption(spec: WorkloadSpec, images: ImageSource, index: int) -> BenchRequest:
    image = index // spec.repeat_image
    return BenchRequest("caption", _form_fields(spec), images.image_png(image))


def _qa(spec: WorkloadSpec, images: ImageSource, index: int) -> BenchRequest:
    image, variant = divmod(index, spec.repeat_image)
    fields = _form_fields(spec) | {"question": images.question(image, variant)}
    return BenchRequest("qa", fields, images.image_png(image))


def _chat_image(spec: WorkloadSpec, images: ImageSource, index: int) -> BenchRequest:
    """Alternates captioning and questions, both as OpenAI chat with a data-URL image part."""
    image, variant = divmod(index, spec.repeat_image)
    text = CAPTION_PROMPT if index % 2 == 0 else images.question(image, variant)
    return _chat(spec, [images.image_png(image)], text)


def _chat_image_mixed(spec: WorkloadSpec, images: ImageSource) -> list[BenchRequest]:
    """Request i shows image i, and in every TWO_IMAGES_EVERY-th also image num_prompts + i,
    so that the first images run through the sizes in order."""
    requests = []
    for index in range(spec.num_prompts):
        pngs = [images.image_png(index)]
        if index % TWO_IMAGES_EVERY == TWO_IMAGES_EVERY - 1:
            pngs.append(images.image_png(spec.num_prompts + index))
            text = TWO_IMAGE_PROMPT
        else:
            text = CAPTION_PROMPT if index % 2 == 0 else images.question(index)
        requests.append(_chat(spec, pngs, text))
    return requests


def _chat(spec: WorkloadSpec, pngs: list[bytes], text: str) -> BenchRequest:
    """One user turn: the images as base64 PNG data URLs, then the text."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": _data_url(png)}} for png in pngs
    ]
    content.append({"type": "text", "text": text})
    messages = [{"role": "user", "content": content}]
    return BenchRequest("chat", _json_fields(spec) | {"messages": messages})


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class TokenCounter:
    """Builds prompts of an exact token count with the checkpoint's tokenizer, else by words."""

    def __init__(self, tokenizer_path: str | None) -> None:
        self._tokenizer: Any = None
        if tokenizer_path is not None:
            from tokenizers import Tokenizer

            path = Path(tokenizer_path)
            file = path / "tokenizer.json" if path.is_dir() else path
            self._tokenizer = Tokenizer.from_file(str(file))

    def prompt(self, rng: random.Random, num_tokens: int) -> str:
        words = [rng.choice(_WORDS) for _ in range(num_tokens)]
        text = " ".join(words)
        if self._tokenizer is None:
            return text
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        while len(ids) < num_tokens:  # a tokenizer may merge words; pad with more of them
            text += " " + rng.choice(_WORDS)
            ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return str(self._tokenizer.decode(ids[:num_tokens]))
