"""Adversarial JSON against the real server: a clear 4xx envelope or a correct 200, never a 5xx.

Invalid and deeply nested JSON, bodies past the cap (declared and streamed),
lone surrogates and NUL bytes in every text field, thousands of stop strings,
absurd n / max_tokens / logprobs / seed, unknown fields, wrong types. Afterwards
nothing is left running, the server's memory has not jumped and it still answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import SHARED_SERVER_SETTINGS, ServerProcess
from tests.e2e.conftest import assert_error, wait_idle
from tests.reliability.procstat import rss_bytes

MAX_BODY_BYTES = int(str(SHARED_SERVER_SETTINGS["max_body_bytes"]))
RSS_JUMP_LIMIT = 200 * 2**20  # what the whole file may add to the server's resident memory
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
SHORT: dict[str, Any] = {"max_tokens": 3}


def _chat(content: Any, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **SHORT, **fields}


def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


# (case id, path, raw body bytes) -> always 400
MALFORMED: list[tuple[str, str, bytes]] = [
    ("truncated", COMPLETIONS, b'{"prompt": "x"'),
    ("trailing comma", COMPLETIONS, b'{"prompt": "x",}'),
    ("top-level array", COMPLETIONS, b'[{"prompt": "x"}]'),
    ("top-level string", CHAT, b'"hello"'),
    ("null", CHAT, b"null"),
    ("empty", COMPLETIONS, b""),
    ("invalid utf-8", COMPLETIONS, b'{"prompt": "\xff\xfe\xfa"}'),
    ("NaN literal", COMPLETIONS, b'{"prompt": "x", "temperature": NaN}'),
    ("Infinity literal", COMPLETIONS, b'{"prompt": "x", "max_tokens": Infinity}'),
    ("huge exponent", COMPLETIONS, b'{"prompt": "x", "max_tokens": 1e999999}'),
    ("20-digit integer", COMPLETIONS, b'{"prompt": "x", "n": 99999999999999999999}'),
    ("nested 100", COMPLETIONS, _nested(100)),
    ("nested 100k", COMPLETIONS, _nested(100_000)),
    ("nested objects 50k", CHAT, b'{"messages": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001),
    ("duplicate keys", COMPLETIONS, b'{"prompt": "x", "max_tokens": 3, "max_tokens": "x"}'),
]

# (case id, path, json body) -> 400, with the named param when given
REFUSED: list[tuple[str, str, dict[str, Any], str | None]] = [
    ("n huge", COMPLETIONS, {"prompt": "x", "n": 10**9}, "n"),
    ("n negative", COMPLETIONS, {"prompt": "x", "n": -1}, "n"),
    ("n float", COMPLETIONS, {"prompt": "x", "n": 1.5}, "n"),
    ("max_tokens 2**63", COMPLETIONS, {"prompt": "x", "max_tokens": 2**63}, "max_tokens"),
    ("max_tokens 10**30", CHAT, _chat("x", max_tokens=10**30), "max_tokens"),
    ("max_tokens 0", COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("max_tokens string", COMPLETIONS, {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("max_tokens bool", COMPLETIONS, {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("logprobs huge", COMPLETIONS, {"prompt": "x", "logprobs": 10**9}, "logprobs"),
    ("logprobs negative", COMPLETIONS, {"prompt": "x", "logprobs": -1}, "logprobs"),
    ("top_logprobs huge", CHAT, _chat("x", logprobs=True, top_logprobs=10**6), "logprobs"),
    ("seed 2**64", COMPLETIONS, {"prompt": "x", "seed": 2**64}, "seed"),
    ("seed below int64", COMPLETIONS, {"prompt": "x", "seed": -(2**63) - 1}, "seed"),
    ("seed 1e300", COMPLETIONS, {"prompt": "x", "seed": 1e300}, "seed"),
    ("temperature string", COMPLETIONS, {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("stream string", COMPLETIONS, {"prompt": "x", "stream": "yes"}, "stream"),
    ("stream 1", CHAT, _chat("x", stream=1), "stream"),
    ("include_usage 0", COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": 0}}, None),
    ("stop number", COMPLETIONS, {"prompt": "x", "stop": 5}, None),
    ("5000 stop strings", COMPLETIONS, {"prompt": "x", "stop": ["s"] * 5000}, None),
    ("5000 chat stops", CHAT, _chat("x", stop=[str(i) for i in range(5000)]), None),
    ("prompt object", COMPLETIONS, {"prompt": {"text": "x"}}, "prompt"),
    ("prompt bool", COMPLETIONS, {"prompt": True}, "prompt"),
    ("prompt mixed list", COMPLETIONS, {"prompt": [1, "two"]}, "prompt"),
    ("prompt 129 items", COMPLETIONS, {"prompt": ["x"] * 129}, None),
    ("token id past vocab", COMPLETIONS, {"prompt": [10**6]}, "prompt"),
    ("token id 2**70", COMPLETIONS, {"prompt": [2**70]}, "prompt"),
    ("token id negative", COMPLETIONS, {"prompt": [-1]}, "prompt"),
    ("messages string", CHAT, {"messages": "hello"}, "messages"),
    ("messages empty", CHAT, {"messages": []}, "messages"),
    ("role unknown", CHAT, {"messages": [{"role": "root", "content": "x"}]}, None),
    ("content number", CHAT, _chat(42), None),
    ("part unknown", CHAT, _chat([{"type": "video", "url": "x"}]), None),
    ("image_url not a string", CHAT, _chat([{"type": "image_url", "image_url": {"url": 7}}]), None),
    ("lone surrogate prompt", COMPLETIONS, {"prompt": "a\ud800b\udfff"}, "prompt"),
    ("lone surrogate list", COMPLETIONS, {"prompt": ["ok", "\udfff"]}, "prompt"),
    ("lone surrogate chat", CHAT, _chat("q\udc00?"), "messages"),
    ("lone surrogate part", CHAT, _chat([{"type": "text", "text": "\ud83d"}]), "messages"),
]

# (case id, path, json body) -> 200 with a short generation
ACCEPTED: list[tuple[str, str, dict[str, Any]]] = [
    ("lone surrogate stop", COMPLETIONS, {"prompt": "x", "stop": ["\ud83d"], **SHORT}),
    ("surrogate pair", COMPLETIONS, {"prompt": "smile \ud83d\ude00", **SHORT}),
    ("NUL prompt", COMPLETIONS, {"prompt": "a\u0000b\u0000", **SHORT}),
    ("NUL chat", CHAT, _chat([{"type": "text", "text": "\u0000" * 100}])),
    ("NUL stop", COMPLETIONS, {"prompt": "x", "stop": ["\u0000"], **SHORT}),
    ("64 long stop strings", COMPLETIONS, {"prompt": "x", "stop": ["ab" * 4000] * 64, **SHORT}),
    (
        "unknown fields",
        COMPLETIONS,
        {"prompt": "x", "frobnicate": {"a": [1]}, "x" * 500: 1, **SHORT},
    ),
    ("10k unknown fields", CHAT, {**_chat("x"), **{f"f{i}": i for i in range(10_000)}}),
    ("integral floats", COMPLETIONS, {"prompt": [5.0, 6.0], "max_tokens": 3.0, "n": 2.0}),
    ("empty string prompt", COMPLETIONS, {"prompt": "", **SHORT}),
    ("null content", CHAT, _chat(None)),
    ("control characters", CHAT, _chat("\u202e\u200b\ufeff\x1b[31m\r\n" * 50)),
]


@pytest.fixture(scope="module", autouse=True)
def server_unharmed(server: ServerProcess, http: httpx.Client) -> Iterator[None]:
    """After every case below: nothing running, no memory jump, and still serving."""
    wait_idle(http)
    before = rss_bytes(server.process.pid)
    yield
    wait_idle(http)
    grown = rss_bytes(server.process.pid) - before
    assert grown < RSS_JUMP_LIMIT, f"the server grew by {grown / 2**20:.0f} MiB"
    response = http.post(COMPLETIONS, json={"prompt": "still there?", **SHORT})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "body"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_json_is_400(http: httpx.Client, path: str, body: bytes) -> None:
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert_error(response, 400)


@pytest.mark.parametrize(
    ("path", "body", "param"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_absurd_values_and_wrong_types_are_400(
    http: httpx.Client, path: str, body: dict[str, Any], param: str | None
) -> None:
    data = json.dumps(body, ensure_ascii=True)  # lone surrogates travel as \\ud800 escapes
    response = http.post(path, content=data, headers={"content-type": "application/json"})
    error = assert_error(response, 400)
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


@pytest.mark.parametrize(("path", "body"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_odd_but_valid_requests_are_served(
    http: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    data = json.dumps(body, ensure_ascii=True)  # lone surrogates travel as \\ud800 escapes
    response = http.post(path, content=data, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert choices and all(choice["finish_reason"] in ("stop", "length") for choice in choices)


def test_bodies_past_the_cap_are_413_declared_or_not(server: ServerProcess) -> None:
    padding = b" " * MAX_BODY_BYTES
    body = b'{"prompt": "x", "max_tokens": 3}' + padding
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
        declared = client.post(COMPLETIONS, content=body)
        assert assert_error(declared, 413)["code"] == "too_large"

        def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to refuse up front
            yield body[:100]
            for start in range(100, len(body), 64_000):
                yield body[start : start + 64_000]

        streamed = client.post(
            COMPLETIONS, content=chunks(), headers={"content-type": "application/json"}
        )
        assert_error(streamed, 413)


def test_a_huge_prompt_under_the_cap_is_a_clear_400(http: httpx.Client) -> None:
    prompt = "red circle " * ((MAX_BODY_BYTES - 1000) // 11)
    error = assert_error(http.post(COMPLETIONS, json={"prompt": prompt, **SHORT}), 400)
    assert error["code"] == "context_length_exceeded"
