"""A scripted OpenAI-style streaming server: known chunks, recorded requests.

Completions and chat stream `max_tokens - 1` text chunks (the first chunk carries
two tokens, as servers do when a character spans tokens) and report the true
count in `usage`; caption and QA stream one chunk per token and send no usage.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class ScriptedServer:
    def __init__(self, fail_with: int | None = None, listed: tuple[str, ...] = ("scripted",)):
        self.fail_with = fail_with
        self.listed = listed  # the ids GET /v1/models lists
        self.bodies: list[dict[str, Any]] = []
        self.forms: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.app = self._build()

    async def _chunks(self, chat: bool, max_tokens: int, usage: bool) -> AsyncIterator[str]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            count = max_tokens - 1 if usage else max_tokens
            for index in range(count):
                text = f" w{index}"
                choice = {"delta": {"content": text}} if chat else {"text": text}
                yield f"data: {json.dumps({'choices': [choice | {'index': 0}]})}\n\n"
            last = {"index": 0, "text": "", "finish_reason": "length"}
            yield f"data: {json.dumps({'choices': [last]})}\n\n"
            if usage:
                counts = {"prompt_tokens": 3, "completion_tokens": max_tokens}
                yield f"data: {json.dumps({'choices': [], 'usage': counts})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1

    def _json_route(self, chat: bool) -> Any:
        async def route(request: Request) -> Any:
            if self.fail_with:
                return JSONResponse({"error": {"message": "busy"}}, status_code=self.fail_with)
            body = await request.json()
            self.bodies.append(body)
            stream = self._chunks(chat, body["max_tokens"], usage=True)
            return StreamingResponse(stream, media_type="text/event-stream")

        return route

    async def _form_route(self, request: Request) -> Any:
        form = await request.form()
        upload: Any = form["image"]
        self.forms.append(
            {k: v for k, v in form.items() if k != "image"} | {"png": await upload.read()}
        )
        stream = self._chunks(False, int(str(form["max_tokens"])), usage=False)
        return StreamingResponse(stream, media_type="text/event-stream")

    def _build(self) -> FastAPI:
        app = FastAPI()
        app.add_api_route("/v1/completions", self._json_route(chat=False), methods=["POST"])
        app.add_api_route("/v1/chat/completions", self._json_route(chat=True), methods=["POST"])
        app.add_api_route("/v1/caption", self._form_route, methods=["POST"])
        app.add_api_route("/v1/qa", self._form_route, methods=["POST"])
        models = {"data": [{"id": name} for name in self.listed]}
        app.add_api_route("/v1/models", lambda: models, methods=["GET"])
        return app
