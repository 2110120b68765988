"""Training batches: scene text for language pretraining, image requests for fine-tuning.

Every prompt is rendered with the tokenizer's own chat template, exactly as the server
renders a caption or QA request, so training and serving see the same tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast
from transformers.image_processing_utils import BaseImageProcessor

from models.scenes.sample import sample
from models.scenes.tokenizer import CAPTION_PROMPT
from models.scenes.world import IMAGE_SIZE, Box, Scene

IGNORE = -100  # cross-entropy's ignore_index
MIN_PATCH_OVERLAP = 0.25  # a patch this much covered by an object is labelled with it
CAPTION_UNITS = 2.0  # loss units per object a caption describes; a QA answer is one unit

CAPTION_TASK = "caption"


@dataclass
class Example:
    """One token sequence with the answer spans its loss is taken on."""

    input_ids: list[int]
    answers: list[tuple[str, int, int]]  # (task, first, end): positions of answer tokens
    units: list[float] | None = None  # each answer's share of the loss; None: 1 each
    patches: list[tuple[int, int, int]] = field(default_factory=list)  # (position, colour, shape)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L] next token at each position
    weights: torch.Tensor  # [B, L] each answer's tokens share weight 1 / answers in batch
    pixel_values: torch.Tensor | None  # [B, 3, H, W]
    answers: list[list[tuple[str, int, int]]]  # per row, spans in target positions
    patch_colour: torch.Tensor | None = None  # [B, L] colour word of the object there, or IGNORE
    patch_shape: torch.Tensor | None = None  # [B, L] shape word of the object there, or IGNORE


def user_message(text: str, with_image: bool) -> dict[str, Any]:
    if not with_image:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def render_ids(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, Any]]) -> list[int]:
    generation_prompt = messages[-1]["role"] == "user"
    text = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=generation_prompt,
        tokenize=False,
    )
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def pick_task(scene: Scene, caption_share: float) -> tuple[str, str, str]:
    """The caption request with probability `caption_share`, else one of the scene's questions."""
    rng = random.Random(f"task-{scene.seed}")
    if rng.random() < caption_share or not scene.qa_by_task:
        return CAPTION_TASK, CAPTION_PROMPT, scene.caption
    task = rng.choice(sorted(scene.qa_by_task))
    question, answer = scene.qa_by_task[task]
    return task, question, answer


def image_example(
    tokenizer: PreTrainedTokenizerFast,
    scene: Scene,
    image_seq_length: int,
    caption_share: float,
    caption_units: float = CAPTION_UNITS,
) -> Example:
    """One single-turn request about one image, exactly as the server's caption and QA routes
    render it. Single turns only: in a longer chat a question asked after the caption could
    be answered from the caption's words instead of from the image."""
    task, prompt, answer = pick_task(scene, caption_share)
    messages = [user_message(prompt, with_image=True)]
    prompt_end = len(render_ids(tokenizer, messages))
    messages.append({"role": "assistant", "content": answer})
    ids = render_ids(tokenizer, messages)
    units = caption_units * len(scene.objects) if task == CAPTION_TASK else 1.0
    example = expand_image(
        Example(ids, [(task, prompt_end, len(ids))], [units]), tokenizer, image_seq_length
    )
    image_id = int(tokenizer.convert_tokens_to_ids("<image>"))  # type: ignore[arg-type]
    first_image = example.input_ids.index(image_id)
    example.patches = patch_labels(tokenizer, scene, image_seq_length, first_image)
    return example


def patch_labels(
    tokenizer: PreTrainedTokenizerFast, scene: Scene, image_seq_length: int, first: int
) -> list[tuple[int, int, int]]:
    """The colour and shape words of the object covering each image token's patch (row-major
    patches, as the vision tower orders them): targets of the grounding loss."""
    grid = math.isqrt(image_seq_length)
    side = IMAGE_SIZE // grid
    labels = []
    for index in range(image_seq_length):
        top, left = divmod(index, grid)
        patch = (left * side, top * side, (left + 1) * side, (top + 1) * side)
        cover = [
            (_overlap(patch, box), obj) for obj, box in zip(scene.objects, scene.boxes, strict=True)
        ]
        area, obj = max(cover, key=lambda pair: pair[0])
        if area >= MIN_PATCH_OVERLAP * side * side:
            colour = int(tokenizer.convert_tokens_to_ids(obj.colour))  # type: ignore[arg-type]
            shape = int(tokenizer.convert_tokens_to_ids(obj.shape))  # type: ignore[arg-type]
            labels.append((first + index, colour, shape))
    return labels


def _overlap(a: Box, b: Box) -> int:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(0, width) * max(0, height)


def expand_image(
    example: Example, tokenizer: PreTrainedTokenizerFast, image_seq_length: int
) -> Example:
    """Repeat the single image token `image_seq_length` times and shift the spans after it."""
    image_id = int(tokenizer.convert_tokens_to_ids("<image>"))  # type: ignore[arg-type]
    at = example.input_ids.index(image_id)
    ids = example.input_ids[:at] + [image_id] * image_seq_length + example.input_ids[at + 1 :]
    shift = image_seq_length - 1
    answers = [(task, first + shift, end + shift) for task, first, end in example.answers]
    return Example(ids, answers, example.units, example.patches)


def text_example(
    tokenizer: PreTrainedTokenizerFast, scene: Scene, caption_only: bool = False
) -> Example:
    """BOS, the scene description (or just its caption), EOS; every token after BOS is learned."""
    text = scene.caption if caption_only else scene.text
    ids = [*tokenizer(text).input_ids, tokenizer.eos_token_id]
    return Example(ids, [("text", 1, len(ids))])


def collate(
    examples: list[Example], pad_id: int, pixel_values: torch.Tensor | None = None
) -> Batch:
    """Right-pad; the loss at position t predicts token t + 1 of an answer span."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    weights = torch.zeros((len(examples), length))
    units = [example.units or [1.0] * len(example.answers) for example in examples]
    total_units = sum(sum(row_units) for row_units in units)
    spans = []
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[row, : len(example.input_ids)] = 1
        row_spans = [(task, first - 1, end - 1) for task, first, end in example.answers]
        for (_, first, end), share in zip(row_spans, units[row], strict=True):
            weights[row, first:end] = share / ((end - first) * total_units)
        spans.append(row_spans)
    targets = torch.roll(input_ids, shifts=-1, dims=1)  # [B, L]; the last column carries no weight
    patch_colour = torch.full_like(input_ids, IGNORE)
    patch_shape = torch.full_like(input_ids, IGNORE)
    for row, example in enumerate(examples):
        for position, colour, shape in example.patches:
            patch_colour[row, position], patch_shape[row, position] = colour, shape
    return Batch(
        input_ids, attention_mask, targets, weights, pixel_values, spans, patch_colour, patch_shape
    )


def text_batch(tokenizer: PreTrainedTokenizerFast, seeds: range) -> Batch:
    examples = [text_example(tokenizer, sample(seed)) for seed in seeds]
    return collate(examples, tokenizer.pad_token_id)


def image_batch(
    tokenizer: PreTrainedTokenizerFast,
    processor: BaseImageProcessor,
    seeds: range,
    image_seq_length: int,
    text_seeds: range = range(0),
    caption_share: float = 0.3,
    caption_units: float = CAPTION_UNITS,
) -> Batch:
    """One image request per scene of `seeds`, then plain scene text for `text_seeds`.

    A QA answer is one unit of loss; a caption is `caption_units` per object it describes
    (each object is a few facts, where a QA answer is one), however many tokens either has.
    """
    scenes = [sample(seed) for seed in seeds]
    examples = [
        image_example(tokenizer, scene, image_seq_length, caption_share, caption_units)
        for scene in scenes
    ]
    # Captions only: full scene texts would be the longest rows and set the padded length.
    examples += [text_example(tokenizer, sample(seed), caption_only=True) for seed in text_seeds]
    pixels = processor([scene.image for scene in scenes], return_tensors="pt")["pixel_values"]
    return collate(examples, tokenizer.pad_token_id, pixels)
