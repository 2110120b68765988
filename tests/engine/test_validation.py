"""The engine's request rules, each in its one home: messages, the field at fault, the code."""

from __future__ import annotations

import pytest
import torch

from app.engine.errors import InvalidRequestError
from app.engine.sequence import ImageInput, SamplingParams
from app.engine.validation import (
    image_spans,
    validate_context,
    validate_length,
    validate_params,
    validate_prompt,
)
from models.base import ModelInfo

VOCAB = 100
IMAGE = 99  # the image token id
IMAGE_LENGTH = 3
MAX_LOGPROBS = 5


def _info(multimodal: bool = True) -> ModelInfo:
    return ModelInfo(
        name="tiny", architecture="Test", num_layers=1, num_kv_heads=1, head_dim=8,
        hidden_size=8, vocab_size=VOCAB, max_model_len=64, dtype=torch.float32,
        device=torch.device("cpu"), eos_token_ids=(2,),
        image_token_id=IMAGE if multimodal else None,
        image_seq_length=IMAGE_LENGTH if multimodal else 0,
    )  # fmt: skip


def _refusal(call: object) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def _params_refusal(params: SamplingParams) -> InvalidRequestError:
    return _refusal(lambda: validate_params(params, _info(), MAX_LOGPROBS))


def test_good_params_pass() -> None:
    params = SamplingParams(max_tokens=8, min_tokens=8, logprobs=5, logit_bias={0: 1.0, 99: -1})
    validate_params(params, _info(), MAX_LOGPROBS)


def test_min_tokens_may_not_exceed_max_tokens() -> None:
    refusal = _params_refusal(SamplingParams(max_tokens=8, min_tokens=9))
    assert (
        refusal.param == "min_tokens"
        and str(refusal) == "min_tokens may not exceed max_tokens (8)."
    )


@pytest.mark.parametrize(
    "params", [SamplingParams(logprobs=MAX_LOGPROBS + 1), SamplingParams(prompt_logprobs=6)]
)
def test_logprobs_are_limited_for_samples_and_prompts(params: SamplingParams) -> None:
    refusal = _params_refusal(params)
    assert refusal.param == "logprobs" and str(refusal) == "logprobs may be at most 5."


def test_logit_bias_ids_lie_in_the_vocabulary() -> None:
    refusal = _params_refusal(SamplingParams(logit_bias={VOCAB: 1.0}))
    assert refusal.param == "logit_bias" and f"[0, {VOCAB})" in str(refusal)


def test_prompt_ids_are_checked() -> None:
    validate_prompt([0, 5, VOCAB - 1], _info())
    empty = _refusal(lambda: validate_prompt([], _info()))
    assert empty.param == "prompt" and str(empty) == "The prompt is empty."
    for bad in ([VOCAB], [-1], [2**70]):
        refusal = _refusal(lambda bad=bad: validate_prompt(bad, _info()))  # type: ignore[misc]
        assert refusal.param == "prompt" and f"[0, {VOCAB})" in str(refusal)


def test_context_refusals_say_every_number_and_what_to_do() -> None:
    validate_context(54, 10, 64)
    too_long = _refusal(lambda: validate_context(10, 55, 64))
    assert (too_long.param, too_long.code) == ("max_tokens", "context_length_exceeded")
    assert "64 tokens, but 65 were requested: 10 in the prompt and 55" in str(too_long)
    assert str(too_long).endswith("Shorten the prompt or lower max_tokens.")
    full = _refusal(lambda: validate_context(64, 1, 64))
    assert full.code == "context_length_exceeded"
    assert "64 in the prompt" in str(full) and "no room to generate" in str(full)


def test_length_also_needs_the_kv_cache_to_hold_the_request() -> None:
    validate_length(30, 10, 64, capacity_tokens=40)
    refusal = _refusal(lambda: validate_length(30, 11, 64, capacity_tokens=40))
    assert "KV cache holds 40 tokens" in str(refusal) and refusal.code is None
    assert "context" in str(_refusal(lambda: validate_length(30, 40, 64, capacity_tokens=40)))


def _image(name: str) -> ImageInput:
    return ImageInput(None, name)


def test_image_spans_find_each_run_of_image_tokens() -> None:
    prompt = [1, *[IMAGE] * IMAGE_LENGTH, 5, *[IMAGE] * IMAGE_LENGTH]
    spans = image_spans(prompt, [_image("a"), _image("b")], _info())
    assert [(span.start, span.image.content_hash) for span in spans] == [(1, "a"), (5, "b")]


def test_an_image_token_typed_in_text_breaks_the_count() -> None:
    """The prompt builder expands every image token, also one typed in the text."""
    typed = [1, *[IMAGE] * IMAGE_LENGTH, 7, *[IMAGE] * IMAGE_LENGTH]
    refusal = _refusal(lambda: image_spans(typed, [_image("a")], _info()))
    assert refusal.param == "prompt"
    assert "6 image tokens, but its 1 image(s) need 3" in str(refusal)
    no_image = _refusal(lambda: image_spans([IMAGE] * IMAGE_LENGTH, [], _info()))
    assert no_image.param == "prompt"


def test_split_runs_and_text_models_are_refused() -> None:
    split = [IMAGE, 1, IMAGE, IMAGE]
    assert "not consecutive" in str(_refusal(lambda: image_spans(split, [_image("a")], _info())))
    text_model = _info(multimodal=False)
    assert image_spans([1, 2], [], text_model) == ()
    refusal = _refusal(lambda: image_spans([1, 2], [_image("a")], text_model))
    assert refusal.param == "images"


def test_a_tiled_image_spans_its_tags_and_maps_offsets_to_rows() -> None:
    """SmolVLM's tiles: tags (7, 8) between an image's tokens belong to its span, and a chunk
    of the span takes only the rows of the image tokens inside it."""
    tiled = ImageInput(None, "t", num_tokens=4, prompt_text="<tiles>")
    prompt = [1, 7, IMAGE, IMAGE, 8, 7, IMAGE, IMAGE, 8, 5, *[IMAGE] * IMAGE_LENGTH]
    first, second = image_spans(prompt, [tiled, _image("b")], _info())
    assert (first.start, first.length, second.start, second.length) == (2, 6, 10, IMAGE_LENGTH)
    assert [first.rows(0, 2), first.rows(2, 5), first.rows(5, 6)] == [(0, 2), (2, 3), (3, 4)]
    assert second.rows(1, 3) == (1, 3)
    one_short = _refusal(lambda: image_spans(prompt[:-1], [tiled, _image("b")], _info()))
    assert "6 image tokens, but its 2 image(s) need 7" in str(one_short)
