"""Incremental detokenisation: byte-level and general paths, UTF-8 safety, stop strings."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from app.engine.detokenizer import Detokenizer, SequenceText
from app.engine.sequence import SamplingParams
from tests.checkpoints import _training_lines, build_tokenizer

MULTIBYTE = "café naïve über straße 東京 日本語 😀 ✓ € and 😀😀 東京の"


@cache
def byte_level() -> PreTrainedTokenizerFast:
    return build_tokenizer(with_image_token=True)


@cache
def metaspace() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer (▁ for spaces, leading space dropped at the start)."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    bpe.train_from_iterator([*_training_lines(), MULTIBYTE], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


def stream_text(
    detok: Detokenizer, prompt: list[int], ids: list[int], skip: bool = True
) -> list[str]:
    stream = detok.new_stream(prompt, skip)
    return [stream.push(i) for i in ids] + [stream.flush()]


class CountingDecodes:
    """A tokenizer whose decode calls are counted."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.num_decodes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.num_decodes += 1
        return str(self.tokenizer.decode(ids, **kwargs))


@pytest.mark.parametrize(("make", "fast"), [(byte_level, True), (metaspace, False)])
def test_only_byte_level_tokenizers_stream_without_decoding(
    make: Callable[[], PreTrainedTokenizerFast], fast: bool
) -> None:
    tokenizer = CountingDecodes(make())
    ids = tokenizer.encode("hello there hello world", add_special_tokens=False)
    assert "".join(stream_text(Detokenizer(tokenizer), [], ids)) == tokenizer.decode(ids)
    assert (tokenizer.num_decodes == 1) == fast  # the fast path decoded nothing, only we did


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_stream_to_the_full_decode(skip: bool) -> None:
    tokenizer = byte_level()
    detok = Detokenizer(tokenizer)
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 20))]
        deltas = stream_text(detok, [], ids, skip)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_multibyte_text_never_streams_a_replacement_character() -> None:
    tokenizer = byte_level()
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert any(tokenizer.convert_tokens_to_string([p]) != p for p in pieces)
    for detok in (Detokenizer(byte_level()), general_path(byte_level())):
        deltas = stream_text(detok, [], ids)
        assert "".join(deltas) == MULTIBYTE
        assert not any("\ufffd" in d for d in deltas)
    # Some characters span tokens: those tokens release nothing until the character completes.
    deltas = stream_text(Detokenizer(tokenizer), [], ids)
    assert "" in deltas[:-1]


def general_path(tokenizer: PreTrainedTokenizerFast) -> Detokenizer:
    detok = Detokenizer(tokenizer)
    detok.byte_table = None
    return detok


def test_general_path_keeps_spacing_that_depends_on_the_prompt() -> None:
    tokenizer = metaspace()
    detok = Detokenizer(tokenizer)
    rng = random.Random(1)
    for line in _training_lines(30):
        words = line.split()
        cut = rng.randint(1, len(words) - 1)
        prompt = tokenizer.encode(" ".join(words[:cut]), add_special_tokens=False)
        output = tokenizer.encode(" ".join(words[:cut] + words[cut:]), add_special_tokens=False)[
            len(prompt) :
        ]
        expected = tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)) :]
        assert "".join(stream_text(detok, prompt, output)) == expected


def test_token_text_for_logprobs() -> None:
    tokenizer = byte_level()
    detok = Detokenizer(tokenizer)
    token_id = int(tokenizer.convert_tokens_to_ids("Ġthe"))  # type: ignore[arg-type]
    assert detok.token_text(token_id) == " the"


def run_text(params: SamplingParams, text: str) -> tuple[list[str], SequenceText]:
    tokenizer = byte_level()
    ids = tokenizer.encode(text, add_special_tokens=False)
    seq_text = SequenceText(Detokenizer(tokenizer).new_stream([], True), params)
    deltas = []
    for token_id in ids:
        if seq_text.append(token_id):
            break
        deltas.append(seq_text.take_delta(finished=False))
    seq_text.finish()
    deltas.append(seq_text.take_delta(finished=True))
    return deltas, seq_text


@pytest.mark.parametrize(
    ("stops", "expected"),
    [
        (["lo wo"], "hel"),
        (["world", "o w"], "hell"),
        (["nowhere"], "hello world, hello there"),
        (["there"], "hello world, hello "),
        (["東京"], "hello world, hello there"),
    ],
)
def test_stop_strings_end_the_text_and_never_leak(stops: list[str], expected: str) -> None:
    deltas, seq_text = run_text(SamplingParams(stop=stops), "hello world, hello there")
    assert "".join(deltas) == expected
    assert seq_text.stopped == (expected != "hello world, hello there")
    for stop in stops:  # no emitted prefix ever held any part of a stop string past the cut
        emitted = ""
        for delta in deltas:
            emitted += delta
            assert expected.startswith(emitted)
            assert stop not in emitted


def test_stop_string_across_multibyte_tokens() -> None:
    deltas, seq_text = run_text(SamplingParams(stop=["京"]), "a 東京 b")
    assert "".join(deltas) == "a 東" and seq_text.stopped


def test_text_that_only_looks_like_a_stop_is_released_at_the_end() -> None:
    deltas, seq_text = run_text(SamplingParams(stop=["there!"]), "hello there")
    assert deltas[-1].endswith("there")  # held back until the end decided
    assert "".join(deltas) == "hello there" and not seq_text.stopped


def test_token_text_names_partial_characters_by_their_bytes() -> None:
    tokenizer = byte_level()
    lead_byte = int(tokenizer.convert_tokens_to_ids("æ"))  # type: ignore[arg-type]  # byte 0xE6
    assert Detokenizer(tokenizer).token_text(lead_byte) == "bytes:\\xe6"
