"""A real `mmgpt serve` driven by the official openai package and by httpx: what should work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from pydantic import BaseModel, Field
from transformers import AutoModelForImageTextToText, AutoTokenizer

from tests.api.images import data_url, scene_png
from tests.e2e.conftest import metric, metrics_text, stream_post

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}
FIXED_LENGTH: dict[str, Any] = {"ignore_eos": True}  # every sample runs to max_tokens


def _image_chat(text: str) -> list[dict[str, Any]]:
    image = {"type": "image_url", "image_url": {"url": data_url(scene_png())}}
    return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]


def test_models_list_the_served_model(openai_client: OpenAI, model_id: str) -> None:
    assert [model.id for model in openai_client.models.list()] == [model_id]
    assert openai_client.models.retrieve(model_id).id == model_id


def test_completion_plain_and_streamed_agree(openai_client: OpenAI, model_id: str) -> None:
    plain = openai_client.completions.create(
        model=model_id, prompt="a red circle", extra_body=FIXED_LENGTH, **GREEDY
    )
    choice = plain.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert plain.usage is not None
    assert plain.usage.completion_tokens == GREEDY["max_tokens"] and plain.usage.prompt_tokens > 0
    chunks = list(
        openai_client.completions.create(
            model=model_id,
            prompt="a red circle",
            stream=True,
            extra_body=FIXED_LENGTH,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_n_samples_with_a_seed_are_reproducible(openai_client: OpenAI, model_id: str) -> None:
    def sample(seed: int) -> list[str]:
        response = openai_client.completions.create(
            model=model_id, prompt="the", n=2, seed=seed, temperature=1.0, max_tokens=16,
            extra_body=FIXED_LENGTH,
        )  # fmt: skip
        assert [choice.index for choice in response.choices] == [0, 1]
        return [choice.text for choice in response.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert first[0] != first[1]  # two samples, not one twice
    assert sample(4321) != first


def test_stop_strings_end_the_text(openai_client: OpenAI, model_id: str) -> None:
    def complete(**fields: Any) -> Any:
        return openai_client.completions.create(
            model=model_id, prompt="two blue squares", max_tokens=24, temperature=0, **fields
        ).choices[0]

    full = complete(extra_body=FIXED_LENGTH).text
    stop = _plain_window(full[len(full) // 3 :])
    assert stop, f"no usable stop string in {full!r}"
    stopped = complete(stop=[stop, "never-seen"])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]


def _plain_window(text: str, width: int = 2) -> str | None:
    """The first `width` printable ASCII characters in a row: an unambiguous stop string."""
    for start in range(len(text) - width + 1):
        window = text[start : start + width]
        if window.isascii() and window.isprintable() and window.strip():
            return window
    return None


def test_prompt_lists_token_ids_echo_and_logprobs(http: httpx.Client, model_id: str) -> None:
    many = http.post(
        "/v1/completions",
        json={"model": model_id, "prompt": ["a", "b"], "n": 2, "max_tokens": 3, **FIXED_LENGTH},
    ).json()
    assert [choice["index"] for choice in many["choices"]] == [0, 1, 2, 3]
    assert many["usage"]["completion_tokens"] == 12
    echoed = http.post(
        "/v1/completions",
        json={"prompt": "red circle", "echo": True, "max_tokens": 4, "temperature": 0},
    ).json()
    assert echoed["choices"][0]["text"].startswith("red circle")
    ids = http.post("/v1/completions", json={"prompt": [1, 40, 41], "max_tokens": 2}).json()
    assert ids["usage"]["prompt_tokens"] == 3
    scored = http.post(
        "/v1/completions",
        json={"prompt": "the", "max_tokens": 5, "logprobs": 2, **FIXED_LENGTH},
    ).json()["choices"][0]["logprobs"]
    assert len(scored["tokens"]) == len(scored["token_logprobs"]) == 5
    assert all(len(top) >= 1 for top in scored["top_logprobs"])
    assert all(logprob <= 0 for logprob in scored["token_logprobs"])


def test_logit_bias_steers_completions_and_chat(
    openai_client: OpenAI, model_id: str, tiny_llava_dir: Path
) -> None:
    forced = 40  # any ordinary token of the tiny model's vocabulary
    text = AutoTokenizer.from_pretrained(tiny_llava_dir).decode([forced] * 4)
    bias = {str(forced): 100}
    completion = openai_client.completions.create(
        model=model_id, prompt="a red circle", logit_bias=bias, extra_body=FIXED_LENGTH,
        temperature=1.0, max_tokens=4,
    )  # fmt: skip
    assert completion.choices[0].text == text
    chat = openai_client.chat.completions.create(
        model=model_id, messages=_image_chat("what is it?"), logit_bias=bias,
        extra_body=FIXED_LENGTH, temperature=0, max_tokens=4,
    )  # fmt: skip
    assert chat.choices[0].message.content == text


def test_echo_with_logprobs_scores_the_prompt_as_transformers_does(
    openai_client: OpenAI, model_id: str, tiny_llava_dir: Path
) -> None:
    """What evaluation harnesses ask for a log-likelihood: the prompt echoed and scored."""
    prompt = [40, 41, 97, 12, 55, 60, 61, 12]
    request: dict[str, Any] = {
        "model": model_id, "prompt": prompt, "echo": True, "logprobs": 2, **GREEDY,
        "max_tokens": 1,
    }  # fmt: skip
    scored = openai_client.completions.create(**request).choices[0]
    logprobs = scored.logprobs
    assert logprobs is not None and logprobs.token_logprobs and logprobs.top_logprobs
    assert len(logprobs.token_logprobs) == len(prompt) + 1  # the prompt, then one new token
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    hf = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir, dtype=torch.float32)
    with torch.inference_mode():
        reference = hf(input_ids=torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
    expected = [reference[i, token].item() for i, token in enumerate(prompt[1:])]
    assert logprobs.token_logprobs[1 : len(prompt)] == pytest.approx(expected, abs=1e-4)
    best = [max(top.values()) for top in logprobs.top_logprobs[1 : len(prompt)] if top]
    assert best == pytest.approx(reference.max(-1).values.tolist(), abs=1e-4)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert scored.text.startswith("".join(logprobs.tokens[: len(prompt)]))
    chunks = list(openai_client.completions.create(stream=True, **request))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for part in streamed for t in part.tokens or []] == logprobs.tokens
    assert [v for part in streamed for v in part.token_logprobs or []] == logprobs.token_logprobs
    _check_prompt_alone(openai_client, {**request, "max_tokens": 0}, scored)


def _check_prompt_alone(openai_client: OpenAI, request: dict[str, Any], scored: Any) -> None:
    """max_tokens 0: the prompt echoed and scored, nothing generated."""
    prompt_len = len(request["prompt"])
    alone = openai_client.completions.create(**request)
    choice = alone.choices[0]
    assert choice.logprobs is not None and choice.finish_reason == "length"
    assert choice.logprobs.tokens == scored.logprobs.tokens[:prompt_len]
    assert choice.logprobs.token_logprobs == scored.logprobs.token_logprobs[:prompt_len]
    assert choice.text == "".join(choice.logprobs.tokens or [])
    assert alone.usage is not None and alone.usage.completion_tokens == 0
    chunks = list(
        openai_client.completions.create(
            stream=True, stream_options={"include_usage": True}, **request
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage == alone.usage


def test_response_format_holds_chat_and_completions_to_a_schema(
    openai_client: OpenAI, model_id: str
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    chat = openai_client.chat.completions.create(
        model=model_id, messages=_image_chat("what is it?"), max_tokens=40, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )  # fmt: skip
    answer = json.loads(chat.choices[0].message.content or "")
    assert set(answer) == {"colour", "count"} and answer["colour"] in ("red", "blue")
    assert isinstance(answer["count"], int) and chat.choices[0].finish_reason == "stop"
    as_schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    completion = openai_client.completions.create(
        model=model_id, prompt="a red circle", max_tokens=40, n=2, seed=3,
        extra_body={"response_format": as_schema},
    )  # fmt: skip
    for choice in completion.choices:
        assert set(json.loads(choice.text)) == {"colour", "count"}, choice.text


class Sighting(BaseModel):
    """What the openai package's parse() helper turns into a strict json_schema."""

    shape: Literal["circle", "square"]
    count: Annotated[int, Field(ge=0, le=9)]


class Report(BaseModel):
    sighting: Sighting


def test_the_openai_parse_helper_gets_its_pydantic_model(
    openai_client: OpenAI, model_id: str
) -> None:
    completion = openai_client.chat.completions.parse(
        model=model_id, messages=_image_chat("what is there?"), response_format=Sighting,
        max_tokens=60, temperature=1.0,
    )  # fmt: skip
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Sighting) and parsed.shape in ("circle", "square")
    called = openai_client.chat.completions.parse(
        model=model_id, messages=_image_chat("report it"), max_tokens=120,
        tools=[openai.pydantic_function_tool(Report)], tool_choice="required",
    )  # fmt: skip
    [call] = called.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, Report)  # nested: its schema uses $defs


CITY = {
    "type": "object",
    "properties": {"city": {"enum": ["Oslo", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "weather", "parameters": CITY}},
    {"type": "function", "function": {"name": "clock", "parameters": NO_ARGUMENTS}},
]


def test_forced_tool_calls_plain_and_streamed(openai_client: OpenAI, model_id: str) -> None:
    asked = [{"role": "user", "content": "weather in Oslo?"}]
    response = openai_client.chat.completions.create(
        model=model_id, messages=asked, tools=TOOLS, tool_choice="required", max_tokens=100
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    arguments = json.loads(call.function.arguments)
    assert call.function.name in ("weather", "clock")
    assert arguments in ({"city": "Oslo"}, {"city": "Rome"}, {})
    named = {"type": "function", "function": {"name": "weather"}}
    chunks = list(
        openai_client.chat.completions.create(
            model=model_id, messages=asked, tools=TOOLS, tool_choice=named, max_tokens=100,
            stream=True,
        )
    )  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert all(not delta.content for delta in deltas)
    [streamed] = [call for delta in deltas for call in delta.tool_calls or []]
    assert streamed.function.name == "weather" and streamed.id.startswith("call_")
    assert json.loads(streamed.function.arguments)["city"] in ("Oslo", "Rome")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_conversation_with_a_tool_turn(openai_client: OpenAI, model_id: str) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}  # fmt: skip
    messages: list[Any] = [
        {"role": "user", "content": "weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    response = openai_client.chat.completions.create(
        model=model_id, messages=messages, tools=TOOLS, max_tokens=8, temperature=0
    )
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    unanswered = openai_client.chat.completions.create(
        model=model_id, messages=messages[:2], tools=TOOLS, max_tokens=1
    )
    assert response.usage is not None and unanswered.usage is not None
    more = response.usage.prompt_tokens - unanswered.usage.prompt_tokens
    assert more >= len("sunny, 24 C") // 4  # the tool's answer reached the prompt


def test_legacy_engines_route(http: httpx.Client, model_id: str) -> None:
    """What openai<1's Completion.create(engine=..., ...) sends."""
    response = http.post(
        f"/v1/engines/{model_id}/completions",
        json={
            "prompt": "a green triangle",
            "max_tokens": 6,
            "n": 2,
            "stop": ["\n"],
            "temperature": 0.5,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == model_id
    assert len(body["choices"]) == 2


def test_chat_with_an_image_plain_and_streamed(openai_client: OpenAI, model_id: str) -> None:
    messages: Any = _image_chat("What is in the picture?")
    plain = openai_client.chat.completions.create(
        model=model_id, messages=messages, extra_body=FIXED_LENGTH, **GREEDY
    )
    assert plain.choices[0].message.role == "assistant"
    assert plain.usage is not None and plain.usage.prompt_tokens > 8  # the image's tokens
    stream = openai_client.chat.completions.create(
        model=model_id, messages=messages, stream=True, extra_body=FIXED_LENGTH, **GREEDY
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_text_turns(openai_client: OpenAI, model_id: str) -> None:
    reply = openai_client.chat.completions.create(
        model=model_id,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi"},
            {"role": "user", "content": [{"type": "text", "text": "Name a shape."}]},
        ],
        max_tokens=4,
    )
    assert reply.choices[0].finish_reason in ("stop", "length")


def _upload(**fields: Any) -> dict[str, Any]:
    return {"files": {"image": ("scene.png", scene_png(), "image/png")}, "data": fields}


def test_caption_plain_and_streamed(http: httpx.Client, model_id: str) -> None:
    fields = {"max_tokens": "10", "temperature": "0", "ignore_eos": "true"}
    plain = http.post("/v1/caption", **_upload(**fields))
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["model"] == model_id and body["usage"]["completion_tokens"] == 10
    assert set(body["choices"][0]) >= {"index", "text", "finish_reason"}
    asked = _upload(stream="true", stream_include_usage="true", **fields)
    events = stream_post(http, "/v1/caption", **asked)
    assert all(set(event) >= {"id", "object", "created", "model", "choices"} for event in events)
    *chunks, usage = events
    assert "".join(e["choices"][0]["text"] for e in chunks) == body["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == body["usage"]


def test_caption_uses_the_chat_template_with_its_prompt(http: httpx.Client, model_id: str) -> None:
    """A caption with prompt P is the chat turn [image, P]: the same greedy text."""
    caption = http.post(
        "/v1/caption",
        **_upload(prompt="Name the shapes.", **{"max_tokens": "8", "temperature": "0"}),
    )
    chat = http.post(
        "/v1/chat/completions",
        json={
            "model": model_id,
            "messages": _image_chat("Name the shapes."),
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert caption.json()["choices"][0]["text"] == chat.json()["choices"][0]["message"]["content"]


def test_qa_plain_and_streamed(http: httpx.Client) -> None:
    fields = {"question": "What colour is the square?", "max_tokens": "8", "temperature": "0"}
    plain = http.post("/v1/qa", **_upload(**fields))
    assert plain.status_code == 200, plain.text
    asked = _upload(stream="true", stream_include_usage="true", **fields)
    *chunks, usage = stream_post(http, "/v1/qa", **asked)
    assert "".join(e["choices"][0]["text"] for e in chunks) == plain.json()["choices"][0]["text"]
    assert usage["choices"] == [] and usage["usage"] == plain.json()["usage"]


@pytest.mark.parametrize(
    ("path", "fields"),
    [("/v1/caption", {}), ("/v1/qa", {"question": "What colour is the square?"})],
)
def test_a_naive_client_reads_every_event_of_a_vision_stream(
    http: httpx.Client, path: str, fields: dict[str, str]
) -> None:
    """A client that reads `choices[0]` of every `data:` event, as a new user writes one: no
    usage-only event (`choices: []`) unless the form asks for it."""
    form = {"stream": "true", "max_tokens": "6", "temperature": "0", **fields}
    text = ""
    with http.stream("POST", path, **_upload(**form)) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line.removeprefix("data: "))["choices"][0]["text"]
    plain = http.post(path, **_upload(**{**form, "stream": "false"}))
    assert text == plain.json()["choices"][0]["text"]


def test_metrics_export_load_and_http_counters(http: httpx.Client) -> None:
    text = metrics_text(http)
    for family in (
        "mmgpt_num_requests_running",
        "mmgpt_num_requests_waiting",
        "mmgpt_kv_cache_usage_ratio",
    ):
        assert f"\n{family} " in text, family
    assert metric(text, "mmgpt_http_requests_total", route="/v1/caption", status="200") >= 1
    assert metric(text, "mmgpt_request_success_total", endpoint="completions") >= 1
    assert metric(text, "mmgpt_images_total") >= 1
    assert metric(text, "mmgpt_model_info") == 1
