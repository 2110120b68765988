"""Conversations -> token ids with labels on the trained assistant turns, and pixel values.

Prompts are rendered as the server renders them (app/prompts.py): the checkpoint's chat
template, tokenised without adding special tokens, each image token expanded to the
tokens one image becomes. A turn's answer is what rendering the conversation up to and
including that turn adds to the prompt rendered with `add_generation_prompt`: the
answer's tokens and whatever the template closes the turn with (EOS, an end marker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jinja2.exceptions import TemplateError

from models.finetune.data import Conversation, LineError, Message

IGNORE = -100  # the label of a token that carries no loss


@dataclass
class Example:
    source: str
    input_ids: list[int]
    labels: list[int]  # IGNORE except on the trained answers' tokens
    pixel_values: torch.Tensor | None  # [num_images, 3, H, W]


@dataclass
class PromptFormat:
    """How one checkpoint turns messages into tokens and images into pixels."""

    tokenizer: Any
    chat_template: str
    image_processor: Any | None
    image_token_id: int | None
    image_seq_length: int
    max_length: int

    def encode(self, conversation: Conversation) -> Example:
        token_ids = self.render(conversation.messages, add_generation_prompt=False)
        labels = [IGNORE] * len(token_ids)
        for turn in conversation.trained_turns:
            start, end = self._answer_span(conversation.messages, turn, token_ids)
            labels[start:end] = token_ids[start:end]
        if len(token_ids) > self.max_length:
            raise LineError(f"{len(token_ids)} tokens; the model takes at most {self.max_length}")
        pixels = self._pixels(conversation, token_ids)
        return Example(conversation.source, token_ids, labels, pixels)

    def render(self, messages: list[Message], add_generation_prompt: bool) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except (TemplateError, ValueError, TypeError, KeyError) as error:
            raise LineError(f"the chat template rejected the messages ({error})") from None
        token_ids: list[int] = self.tokenizer(str(text), add_special_tokens=False)["input_ids"]
        return self._expand_images(token_ids)

    def _answer_span(
        self, messages: list[Message], turn: int, token_ids: list[int]
    ) -> tuple[int, int]:
        prompt = self.render(messages[:turn], add_generation_prompt=True)
        through = self.render(messages[: turn + 1], add_generation_prompt=False)
        consistent = token_ids[: len(through)] == through and through[: len(prompt)] == prompt
        if not consistent or len(through) <= len(prompt):
            raise LineError(
                f"messages[{turn}]: the chat template does not render this answer after its "
                "prompt, so its tokens cannot be told apart"
            )
        return len(prompt), len(through)

    def _expand_images(self, token_ids: list[int]) -> list[int]:
        image_token = self.image_token_id
        if image_token is None or image_token not in token_ids:
            return token_ids
        expanded: list[int] = []
        for token_id in token_ids:
            expanded.extend(
                [image_token] * self.image_seq_length if token_id == image_token else [token_id]
            )
        return expanded

    def _pixels(self, conversation: Conversation, token_ids: list[int]) -> torch.Tensor | None:
        images, processor = conversation.images, self.image_processor
        if images and processor is None:
            raise LineError("the model takes no images")
        placeholders = 0 if self.image_token_id is None else token_ids.count(self.image_token_id)
        if placeholders != len(images) * self.image_seq_length:
            raise LineError(
                f"{len(images)} images but the chat template rendered "
                f"{placeholders // max(self.image_seq_length, 1)} image tokens"
            )
        if not images or processor is None:
            return None
        try:
            batch = processor(images=images, return_tensors="np")["pixel_values"]
        except Exception as error:  # processors raise many types for an image they refuse
            raise LineError(f"the image processor rejected an image ({error})") from None
        return torch.from_numpy(np.ascontiguousarray(np.asarray(batch, dtype=np.float32)))


def encode_all(
    prompt_format: PromptFormat, conversations: list[Conversation]
) -> tuple[list[Example], list[str]]:
    """Every conversation encoded, and a problem line for each one that cannot be."""
    examples: list[Example] = []
    problems: list[str] = []
    for conversation in conversations:
        try:
            examples.append(prompt_format.encode(conversation))
        except LineError as error:
            problems.append(f"{conversation.source}: {error}")
    return examples, problems
