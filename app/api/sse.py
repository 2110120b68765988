"""Server-Sent Events: the wire format and a response that notices a client leaving."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def streamed_ok(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 of a generating route: JSON, or with `stream: true` Server-Sent Events.

    Each event's data is a `chunk` (or, after a failure, the error envelope) as
    JSON, and the last one is `[DONE]`. The schema describes one event, as
    OpenAPI does for event streams. generation.stream_events writes them.
    """
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk.__name__), _ref("ErrorResponse")]},
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
    }
    return {
        200: {
            "description": "The result; with stream=true, Server-Sent Events of its chunks "
            "(`data: {...}` lines) ending in `data: [DONE]`. Only when the request asks for "
            "usage (stream_options.include_usage; stream_include_usage in a form) does the "
            "chunk before [DONE] carry no choices and the token usage.",
            "content": {"text/event-stream": {"schema": event}},
        }
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def sse(payload: BaseModel | dict[str, Any]) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


class EventStreamResponse(StreamingResponse):
    """Streams `text/event-stream`, cancelling the body the moment the client disconnects.

    Listening for the disconnect (rather than waiting for a failed write) matters
    while a request is queued or prefilling: nothing is written then, yet its
    engine request must be aborted at once.
    """

    media_type = "text/event-stream"

    def __init__(self, content: Any) -> None:
        super().__init__(content, headers=SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    with contextlib.suppress(OSError):  # the connection broke while writing
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            # A body cancelled while paused at a `yield` is not finalised by the
            # cancellation; closing it here runs its cleanup (the engine abort) now.
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()
