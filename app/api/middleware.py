"""The gate every HTTP request passes: size, key and drain checks, in-flight count, metrics.

A pure ASGI middleware, so that refusals happen before a body is read: a body
whose Content-Length is over the cap, a request without a valid key, a request
arriving while the server drains never cost more than their headers.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.errors import CLIENT_CLOSED_REQUEST, ERROR_CODE_STATE_KEY, APIError, body_cap_message
from app.service import Service, draining


class BodyTooLarge(HTTPException):
    """Raised while reading a body that grows past the cap (no Content-Length up front)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, body_cap_message(limit))


class GateMiddleware:
    def __init__(self, app: ASGIApp, service: Service, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.service = service
        self.routes = routes  # with a `path`: the templates that label the metrics
        self.api_keys = [key.encode() for key in service.settings.api_key_values()]
        self.max_body_bytes = service.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = CLIENT_CLOSED_REQUEST

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_noting_status)
        except Exception:
            status = 500
            raise
        finally:
            code = scope.get("state", {}).get(ERROR_CODE_STATE_KEY)
            metrics.record_http_request(route_template(scope, self.routes), status, code)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope)
        if refusal is not None:
            scope.setdefault("state", {})[ERROR_CODE_STATE_KEY] = refusal.code
            await refusal.to_response()(scope, receive, send)
            return
        if not scope["path"].startswith("/v1/"):
            await self.app(scope, self._capped(receive), send)
            return
        self.service.in_flight += 1
        try:
            await self.app(scope, self._capped(receive), send)
        finally:
            self.service.in_flight -= 1

    def _refusal(self, scope: Scope) -> APIError | None:
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            return APIError(413, body_cap_message(self.max_body_bytes), code="too_large")
        if not scope["path"].startswith("/v1/"):
            return None
        if self.api_keys and not self._authorized(scope):
            return APIError(
                401,
                "Missing or invalid API key; send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if self.service.status.value in ("draining", "stopped"):
            return draining()
        return None

    def _authorized(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        matched = False
        for key in self.api_keys:  # every key compared, each in constant time
            matched |= hmac.compare_digest(token.strip(), key)
        return matched

    def _capped(self, receive: Receive) -> Receive:
        received, limit = 0, self.max_body_bytes

        async def receive_capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        return receive_capped


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return b""


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value.isdigit() else None


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The path template of the matching route: a low-cardinality metrics label."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", "unmatched"))
        if match is Match.PARTIAL and partial is None:
            partial = str(getattr(route, "path", "unmatched"))
    return partial or "unmatched"
