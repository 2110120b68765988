"""The app in-process, before its model is loaded: gates, auth, caps, drain, the OpenAPI schema.

Without the lifespan the service stays in its loading state, which is exactly
what these need: every answer here comes from the HTTP layer, not the engine.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app
from tests.e2e.conftest import assert_error

pytestmark = pytest.mark.anyio
KEY = "sk-in-process-secret"


def _app(tmp_path: Path, **settings: Any) -> FastAPI:
    return create_app(Settings(model=str(tmp_path), **settings))


def _client(app: FastAPI, **kwargs: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://test", **kwargs)


async def test_health_answers_while_loading_and_ready_says_503(tmp_path: Path) -> None:
    async with _client(_app(tmp_path)) as client:
        health = await client.get("/health")
        assert health.status_code == 200 and health.json()["detail"] == "loading"
        ready = await client.get("/ready")
        assert_error(ready, 503)
        assert ready.headers["retry-after"]
        response = await client.post("/v1/completions", json={"prompt": "x"})
        assert assert_error(response, 503)["code"] == "not_ready"
        assert response.headers["retry-after"]
        models = await client.get("/v1/models")
        assert models.status_code == 200 and models.json()["data"][0]["id"] == tmp_path.name
        assert (await client.get("/docs")).status_code == 200


async def test_malformed_requests_are_envelopes(tmp_path: Path) -> None:
    async with _client(_app(tmp_path)) as client:
        bad_json = await client.post(
            "/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"}
        )
        assert "not valid JSON" in assert_error(bad_json, 400)["message"]
        unknown_path = await client.get("/v1/nothing-here")
        assert_error(unknown_path, 404)
        wrong_method = await client.get("/v1/completions")
        assert_error(wrong_method, 405)


async def test_auth_gates_v1_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with _client(_app(tmp_path, api_keys=f"other-key,{KEY}")) as client:
        missing = await client.get("/v1/models")
        assert assert_error(missing, 401)["code"] == "invalid_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
        assert_error(wrong, 401)
        not_bearer = await client.get("/v1/models", headers={"Authorization": f"Basic {KEY}"})
        assert_error(not_bearer, 401)
        right = await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert right.status_code == 200
        unauthenticated_post = await client.post("/v1/completions", content=b"not even json")
        assert_error(unauthenticated_post, 401)  # refused before the body is parsed
        for open_path, status in (("/health", 200), ("/ready", 503), ("/metrics", 200)):
            assert (await client.get(open_path)).status_code == status
    assert KEY not in caplog.text


async def test_without_keys_v1_is_open(tmp_path: Path) -> None:
    async with _client(_app(tmp_path)) as client:
        assert (await client.get("/v1/models")).status_code == 200


async def test_body_cap_applies_before_reading(tmp_path: Path) -> None:
    async with _client(_app(tmp_path, max_body_bytes=1000)) as client:
        declared = await client.post("/v1/completions", content=b"x" * 1001)
        assert assert_error(declared, 413)["code"] == "too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(5):
                yield b'{"prompt": "' + b"y" * 400

        streamed = await client.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_error(streamed, 413)


async def test_draining_refuses_new_requests(tmp_path: Path) -> None:
    app = _app(tmp_path)
    app.state.service.begin_drain()
    async with _client(app) as client:
        assert_error(await client.get("/ready"), 503)
        refused = await client.post("/v1/completions", json={"prompt": "x"})
        assert assert_error(refused, 503)["code"] == "shutting_down"
        assert refused.headers["retry-after"]
        assert (await client.get("/health")).status_code == 200


async def test_metrics_label_routes_by_template(tmp_path: Path) -> None:
    async with _client(_app(tmp_path)) as client:
        await client.post("/v1/engines/some-engine/completions", json={"prompt": "x"})
        text = (await client.get("/metrics")).text
    assert 'route="/v1/engines/{engine}/completions",status="503"' in text
    assert "some-engine" not in text


def test_openapi_documents_every_request_field_and_no_422(tmp_path: Path) -> None:
    schema = _app(tmp_path).openapi()
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            assert "422" not in operation["responses"], path
    for name in ("CompletionRequest", "ChatCompletionRequest", "CaptionForm", "QAForm"):
        for field, spec in components[name]["properties"].items():
            assert spec.get("description"), f"{name}.{field} is undocumented"
    caption = schema["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in caption
    for path in ("/v1/completions", "/v1/caption", "/v1/qa", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"400", "413", "503"} <= set(responses), path
