"""Incremental detokenisation and stop strings.

A token of a byte-level BPE can end in the middle of a UTF-8 character, so
text is released only once it is complete: a stream never emits a
replacement character that decoding all tokens at once would not contain.

Byte-level tokenizers (GPT-2, Llama 3 and the like) take a fast path: each
token id maps to its bytes once, and a sequence's text is those bytes fed to
an incremental UTF-8 decoder, with no tokenizer call per token. Other
tokenizers take the general path: decode a short window of recent tokens and
release what grew, starting from a few prompt tokens so that spacing rules
that depend on the previous token (SentencePiece's leading space) hold.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any, Protocol

from tokenizers import decoders

from app.engine.sequence import SamplingParams

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens the general path decodes along with the output
MEMO_WINDOW_TOKENS = 3  # the general path remembers the text of windows up to this length
MEMO_MAX_ENTRIES = 100_000  # and forgets them all past this many


def _byte_level_alphabet() -> dict[str, int]:
    """The printable character standing for each byte in byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TextStream(Protocol):
    def push(self, token_id: int) -> str:
        """Text completed by this token (possibly empty)."""
        ...

    def flush(self) -> str:
        """Whatever text is still held back, at the end of the sequence."""
        ...


class Detokenizer:
    """Per-tokenizer tables, shared by every sequence's stream."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self.byte_table = _byte_table(tokenizer)  # None: not byte-level, use the general path
        self._token_texts: dict[int, str] = {}
        self._window_texts: dict[tuple[tuple[int, ...], bool], str] = {}

    def new_stream(self, prompt_token_ids: list[int], skip_special_tokens: bool) -> TextStream:
        if self.byte_table is not None:
            skipped = self.special_ids if skip_special_tokens else frozenset()
            return _ByteStream(self.byte_table, skipped)
        context = prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]
        return _WindowStream(self._window_decoder, context, skip_special_tokens)

    def _window_decoder(self, ids: list[int], skip_special_tokens: bool) -> str:
        """tokenizer.decode, remembered for short windows (most windows are one or two tokens)."""
        if len(ids) > MEMO_WINDOW_TOKENS:
            text: str = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
            return text
        key = (tuple(ids), skip_special_tokens)
        cached = self._window_texts.get(key)
        if cached is not None:
            return cached
        if len(self._window_texts) >= MEMO_MAX_ENTRIES:
            self._window_texts.clear()
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self._window_texts[key] = text
        return text

    def token_text(self, token_id: int) -> str:
        """One token on its own, for logprobs.

        A byte-level token that is not valid UTF-8 on its own (part of a character)
        is written "bytes:\\xe6\\x9d" as OpenAI does, so that such tokens stay distinct.
        """
        text = self._token_texts.get(token_id)
        if text is None:
            if self.byte_table is not None and 0 <= token_id < len(self.byte_table):
                text = _bytes_text(self.byte_table[token_id])
            else:
                text = self.tokenizer.decode([token_id])
            self._token_texts[token_id] = text
        return text


def _bytes_text(token_bytes: bytes) -> str:
    try:
        return token_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in token_bytes)


def _byte_table(tokenizer: Any) -> list[bytes] | None:
    """The bytes of every token id, when the tokenizer decodes byte-level and nothing else."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    if not isinstance(backend.decoder, decoders.ByteLevel) or backend.normalizer is not None:
        return None
    alphabet = _byte_level_alphabet()
    to_latin1 = str.maketrans({char: chr(byte) for char, byte in alphabet.items()})
    table = [b""] * backend.get_vocab_size(with_added_tokens=True)
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        if alphabet.keys() >= set(token):
            table[token_id] = token.translate(to_latin1).encode("latin-1")
        else:  # added tokens outside the alphabet decode as their own text
            table[token_id] = token.encode("utf-8")
    return table


class _ByteStream:
    def __init__(self, table: list[bytes], skipped: frozenset[int]) -> None:
        self._table = table
        self._skipped = skipped
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id in self._skipped or not 0 <= token_id < len(self._table):
            return ""
        text: str = self._utf8.decode(self._table[token_id])
        return text

    def flush(self) -> str:
        text: str = self._utf8.decode(b"", final=True)
        return text


class _WindowStream:
    """Decodes ids[prefix:] against ids[prefix:read] and releases the growth."""

    def __init__(
        self,
        decode: Callable[[list[int], bool], str],
        context: list[int],
        skip_special_tokens: bool,
    ) -> None:
        self._decode_ids = decode
        self._skip = skip_special_tokens
        self._ids = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]


class SequenceText:
    """One sample's output text: incremental, cut at the first stop string.

    Only text not yet emitted is kept. Text that could be the start of a stop
    string is held back until the next tokens decide, so no part of a stop
    string ever reaches the caller; hence a stop string always begins in the
    unsent text, and only that text is searched.
    """

    def __init__(self, stream: TextStream, params: SamplingParams) -> None:
        self._stream = stream
        self._stops = [s for s in params.stop if s]
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._unsent = ""
        self.stopped = False  # a stop string was found

    def append(self, token_id: int) -> bool:
        """Add one token's text; True when a stop string ends the output here."""
        new_text = self._stream.push(token_id)
        if new_text and not self.stopped:
            self._add(new_text)
        return self.stopped

    def finish(self) -> None:
        """The sequence ended: release held-back bytes (unless the text already stopped)."""
        if not self.stopped:
            tail = self._stream.flush()
            if tail:
                self._add(tail)

    def _add(self, new_text: str) -> None:
        if not self._stops:
            self._unsent += new_text
            return
        search_from = max(0, len(self._unsent) - self._max_stop_len + 1)
        self._unsent += new_text
        hits = [i for s in self._stops if (i := self._unsent.find(s, search_from)) >= 0]
        if hits:
            self._unsent = self._unsent[: min(hits)]
            self.stopped = True

    def take_delta(self, finished: bool) -> str:
        """Text not yet emitted; while running, minus a tail that may begin a stop string."""
        unsent = self._unsent
        held = 0 if finished or self.stopped or not self._stops else self._held_back()
        if held == 0:
            self._unsent = ""
            return unsent
        self._unsent = unsent[len(unsent) - held :]
        return unsent[: len(unsent) - held]

    def _held_back(self) -> int:
        """Length of the longest tail of the unsent text that is a proper prefix of a stop."""
        text, longest = self._unsent, 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
