"""Structured output: generation held to a JSON schema (`response_format`, forced tool calls).

llguidance does the work. A request's schema becomes a grammar, compiled and checked
before the request is queued (a bad schema is a 400, not a failed generation); each of
its samples gets a matcher, which the sampler asks for the tokens allowed next and which
then consumes the token drawn. The JSON is compact (no free whitespace between tokens):
a small model left free to put whitespace anywhere tends to spend its budget on it.

The tokenizer's llguidance form is built on first use, once (it reads every token of the
vocabulary), and shared by every request. Tokenizers llguidance cannot read (WordPiece,
for one) make structured requests a 400; everything else still serves.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

# the JSON compiler's options (llguidance's JsonCompileOptions)
COMPACT_JSON: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The schema cannot be served: invalid, or this model's tokenizer is not supported."""


class StructuredOutputs:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self.vocab_size = vocab_size  # the model's logit width, maybe above the tokenizer's
        self._tokenizer, self._eos = tokenizer, list(eos_token_ids)
        self._ll_tokenizer: Any = None
        self._error: str | None = None
        self._lock = threading.Lock()  # built once, from whichever thread asks first

    def json_schema_grammar(self, schema: dict[str, Any]) -> str:
        """The grammar of JSON matching `schema`; raises GrammarError."""
        from llguidance import LLMatcher

        tokenizer = self._llg_tokenizer()
        try:
            grammar: str = LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
        except ValueError as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from exc
        error = LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise GrammarError(f"unsupported JSON schema: {error}")
        return grammar

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher at the start of `grammar` (one per sample)."""
        from llguidance import LLMatcher

        return LLMatcher(self._llg_tokenizer(), grammar, log_level=0)

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None and self._error is None:
                self._build()
        if self._error is not None:
            raise GrammarError(self._error)
        return self._ll_tokenizer

    def _build(self) -> None:
        from llguidance.hf import from_tokenizer

        try:
            self._ll_tokenizer = from_tokenizer(
                self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos
            )
        except Exception as exc:  # llguidance reads only byte-level and byte-fallback vocabularies
            self._error = f"this model's tokenizer cannot be held to a JSON schema ({exc})"


def consume(matcher: Any, token_id: int) -> str | None:
    """Feed the sampled token; "stop" once the grammar is complete, "error" if it broke."""
    if not matcher.consume_token(token_id):
        return "error"
    return "stop" if matcher.is_stopped() else None
