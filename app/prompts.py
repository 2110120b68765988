"""Prompt building: chat template, image token expansion, caption and QA prompts.

The one tokeniser wrapper of the API. Chat, caption and QA prompts go through the
checkpoint's chat template with `{"type": "image"}` parts; the rendered string is
tokenised without adding special tokens again (the template has them), then the k-th
image token becomes as many copies as the k-th image's processor said (a fixed-size
family's `image_seq_length`), or the tokens of the text its processor wrote for it
(SmolVLM's tiles between their row/column tags), the layout the engine expects.
Completions tokenise the raw prompt the way the tokenizer does by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from jinja2.exceptions import TemplateError

from app.errors import bad_request

if TYPE_CHECKING:
    from models.base import ModelInfo

# Above this many characters, tokenising moves off the event loop.
INLINE_TOKENIZE_CHARS = 4096
Message = dict[str, Any]  # {"role": str, "content": str | list[{"type": "text"|"image", ...}]}
T = TypeVar("T")


def image_message(text: str) -> list[Message]:
    """One user turn: an image, then `text`."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def check_unicode(text: str, param: str) -> None:
    """JSON lets lone surrogates ("\\ud800") through; they are no text a tokenizer can encode."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise bad_request(
            f"The text is not valid Unicode ({error.reason}, at character {error.start}).", param
        ) from None


class PromptBuilder:
    """Turns requests into the token ids `engine.submit` takes, for one loaded model."""

    def __init__(
        self,
        tokenizer: Any,
        info: ModelInfo,
        chat_template: str | None,
        caption_prompt: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self.caption_prompt = (
            caption_prompt or info.caption_prompt
        )  # the server's, else the model's
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self._limiter = anyio.CapacityLimiter(1)  # one tokenising thread: no contention

    async def run(self, num_chars: int, build: Callable[..., T], *args: Any) -> T:
        """Runs `build(*args)` inline for short inputs, in a worker thread for long ones."""
        if num_chars <= INLINE_TOKENIZE_CHARS:
            return build(*args)
        return await anyio.to_thread.run_sync(build, *args, limiter=self._limiter)

    def completion(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """A completions prompt: text tokenised as the tokenizer does (BOS included), or ids.
        The engine checks the ids (not empty, in the vocabulary) when the prompt is submitted."""
        if isinstance(prompt, str):
            check_unicode(prompt, param)
            token_ids: list[int] = self.tokenizer(prompt)["input_ids"]
        else:
            token_ids = list(prompt)
        if self.info.image_token_id is not None and self.info.image_token_id in token_ids:
            raise bad_request("Completion prompts cannot hold image tokens; use chat.", param)
        return token_ids

    def chat(
        self,
        messages: list[Message],
        param: str = "messages",
        tools: list[dict[str, Any]] | None = None,
        image_tokens: Sequence[int | str] = (),
    ) -> list[int]:
        """Renders the chat template (with the tools the model is shown, if any) and expands
        the k-th image token into `image_tokens[k]` copies (0 or absent: the model's fixed
        count), or into the tokens of `image_tokens[k]` where that is the image's text. The
        engine checks that the image tokens match the request's images (an image token typed
        in the text does not)."""
        text = self._render(messages, param, tools)
        if self.info.image_prompt is not None:  # the processor's text around each image
            marker, image_text = self.info.image_prompt
            text = text.replace(marker, image_text)
        check_unicode(text, param)
        token_ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._expand_images(token_ids, image_tokens)

    def caption(self, prompt: str | None, image_tokens: int | str = 0) -> list[int]:
        message = image_message(prompt or self.caption_prompt)
        return self.chat(message, param="prompt", image_tokens=[image_tokens])

    def question(self, question: str, image_tokens: int | str = 0) -> list[int]:
        return self.chat(image_message(question), param="question", image_tokens=[image_tokens])

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=False))

    def _render(
        self, messages: list[Message], param: str, tools: list[dict[str, Any]] | None = None
    ) -> str:
        if not self.chat_template:
            raise bad_request(f"The model {self.info.name} has no chat template.", param)
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.chat_template,
                add_generation_prompt=True,
                tokenize=False,
            )
        except (TemplateError, ValueError, TypeError, KeyError) as error:
            raise bad_request(f"The chat template rejected the messages: {error}", param) from None
        return str(rendered)

    def _expand_images(self, token_ids: list[int], image_tokens: Sequence[int | str]) -> list[int]:
        image_token = self.info.image_token_id
        if image_token is None or image_token not in token_ids:
            return token_ids
        expanded: list[int] = []
        index = 0
        for token_id in token_ids:
            if token_id != image_token:
                expanded.append(token_id)
                continue
            placeholder = image_tokens[index] if index < len(image_tokens) else 0
            expanded.extend(self._image_placeholder(placeholder))
            index += 1
        return expanded

    def _image_placeholder(self, placeholder: int | str) -> list[int]:
        """An image's tokens: its text tokenised (tags are special tokens, so the text
        splits alone as it would inside the prompt), or its count of image tokens."""
        if isinstance(placeholder, str):
            ids: list[int] = self.tokenizer(placeholder, add_special_tokens=False)["input_ids"]
            return ids
        return [self.info.image_token_id or 0] * (placeholder or self.info.image_seq_length)
