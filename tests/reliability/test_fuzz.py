"""The real server fuzzed from its own OpenAPI schema with schemathesis.

Every operation gets schema-valid and schema-violating examples. Each answer
must pass schemathesis' checks (no 5xx, a documented status code and content
type, a body that conforms to the schema, schema-violating data refused) and
ours: every error is the OpenAI envelope, every event stream ends in
`data: [DONE]` with JSON chunks before it. Generations are kept short (at most
MAX_TOKENS tokens, n at most 2) so that the run stays bounded.

Not checked: that every schema-valid request is accepted. The schema cannot say
"a decodable image" or "fits the context window"; such requests get a 4xx that
tests/reliability/test_images.py and test_json.py look at one by one. Nor, for
the multipart uploads, that every schema-violating value is refused: form fields
are text, read leniently ("0.0" is the integer 0, a repeated field counts once),
which JSON types cannot express; those answers must still be a 2xx or a 4xx
envelope. JSON bodies are strictly typed and checked both ways.

The schema is built in-process (schemathesis' lazy loader does not run on this
pytest); the first test proves it is the one the server serves.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case, CheckContext, CheckFunction, GenerationMode, Response
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from app.config import Settings
from app.main import create_app
from tests.api.images import scene_png
from tests.conftest import API_KEY, SHARED_SERVER_SETTINGS, ServerProcess

EXAMPLES_PER_OPERATION = 100  # per generation mode, before any shrinking
MAX_TOKENS = 4
MAX_N = 2
SESSION_SETTINGS = Settings(model="unused", api_keys=API_KEY, **SHARED_SERVER_SETTINGS)  # type: ignore[arg-type]
SCHEMA = create_app(SESSION_SETTINGS).openapi()

schema = schemathesis.openapi.from_dict(SCHEMA)
schema.config.update(request_timeout=120)
schema.config.max_stream_events = 4 * 128 * MAX_N * (MAX_TOKENS + 2)  # a whole stream is read
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=EXAMPLES_PER_OPERATION,
    deterministic=True,
    database="none",
    with_security_parameters=False,  # the key is the server's; a fuzzed one would just be a 401
)
CALLS: Counter[str] = Counter()  # requests sent, by operation
STATUSES: Counter[int] = Counter()


def test_the_fuzzed_schema_is_the_one_the_server_serves(http: httpx.Client) -> None:
    served = http.get("/openapi.json")
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(SCHEMA))


def bound(case: Case) -> None:
    """Short generations: small max_tokens and n; a real picture in half the uploads."""
    if not isinstance(case.body, dict):
        return
    body: dict[str, Any] = case.body
    for name in ("max_tokens", "max_completion_tokens"):
        if _is_int(body.get(name)) and body[name] > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # chat and uploads default to the rest of the context
    if _is_int(body.get("n")) and 1 <= body["n"] <= 128:
        body["n"] = min(body["n"], MAX_N)
    # an upload (a fuzzed JSON body may hold an "image" key too, which stays as it is):
    # multipart sends an empty list as nothing at all, so say so
    if case.media_type == "multipart/form-data" and "image" in body:
        for name in [name for name, value in body.items() if value == []]:
            del body[name]
        if CALLS[case.operation.label] % 2:
            body["image"] = scene_png()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def openai_envelope(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every error answer is {"error": {message, type, param, code}}; streams end in [DONE]."""
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code >= 400:
        body = json.loads(response.content)
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    elif content_type.startswith("text/event-stream") and not response.stream_cut_short:
        _check_event_stream(response.content.decode())
    return None


def _check_event_stream(text: str) -> None:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events and events[-1] == "[DONE]", text[-500:]
    for event in events[:-1]:
        payload = json.loads(event)
        if "error" in payload:  # an error after the 200 was sent: still the envelope
            assert set(payload["error"]) == {"message", "type", "param", "code"}, payload


@schema.parametrize()
def test_every_operation_from_its_schema(case: Case, server: ServerProcess) -> None:
    bound(case)
    CALLS[case.operation.label] += 1
    excluded: list[CheckFunction] = [positive_data_acceptance]
    if case.media_type == "multipart/form-data":
        excluded.append(negative_data_rejection)
    response = case.call_and_validate(
        base_url=server.url,
        headers=server.headers,
        additional_checks=[openai_envelope],
        excluded_checks=excluded,
    )
    STATUSES[response.status_code] += 1


def test_every_operation_was_fuzzed(capsys: pytest.CaptureFixture[str]) -> None:
    if not CALLS:
        pytest.skip("counts the requests of test_every_operation_from_its_schema, not selected")
    operations = {
        f"{method.upper()} {path}" for path, items in SCHEMA["paths"].items() for method in items
    }
    assert set(CALLS) == operations, "some operation was not fuzzed"
    assert all(count >= 10 for count in CALLS.values()), CALLS
    assert not [status for status in STATUSES if status >= 500], STATUSES
    with capsys.disabled():
        print(f"\nfuzzed {sum(CALLS.values())} requests: {dict(CALLS)}; statuses {dict(STATUSES)}")
