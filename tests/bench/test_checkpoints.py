"""The benchmark checkpoints' tokenizer: GPT-2's layout, built without a download."""

from __future__ import annotations

from bench.checkpoints import END_OF_TEXT, build_gpt2_tokenizer


def test_byte_level_tokenizer_round_trips_and_ends_with_end_of_text() -> None:
    tokenizer = build_gpt2_tokenizer(vocab_size=1_000)
    assert len(tokenizer) == 1_000
    assert tokenizer.convert_tokens_to_ids(END_OF_TEXT) == 999 == tokenizer.eos_token_id
    text = "the quick brown fox, 123! café"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges apply: letters group into longer tokens
