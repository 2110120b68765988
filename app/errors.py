"""The OpenAI error envelope, the API's own error type, and the handlers that use them.

Every non-2xx response of the service is `{"error": {"message", "type", "param",
"code"}}` with an honest status code, whichever layer refused the request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    EngineNotRunningError,
    EngineOverloadedError,
    InvalidRequestError,
)

logger = logging.getLogger("mmgpt.api")

CLIENT_CLOSED_REQUEST = 499  # recorded (never sent) when the client left before the answer
OVERLOADED_RETRY_AFTER_S = 1
NOT_READY_RETRY_AFTER_S = 5

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}

# The failure reason (app.metrics.FAILURE_REASONS) that each refused status stands for.
FAILURE_REASON_BY_STATUS = {
    400: "validation",
    401: "unauthorized",
    404: "not_found",
    405: "validation",
    413: "too_large",
    415: "unsupported_media",
    429: "overloaded",
    503: "overloaded",
}
# A 503 is "overloaded" only when the queue is full: these codes mean a server that is not
# (or no longer) serving: loading, failed, stuck, draining, or aborting at shutdown.
NOT_READY_CODES = frozenset({"not_ready", "shutting_down", "aborted"})
# Where an error response leaves its code for the gate middleware (in the ASGI scope state).
ERROR_CODE_STATE_KEY = "mmgpt_error_code"


def failure_reason(status: int, code: str | None) -> str | None:
    """The metrics reason of a refused request: by its error code, else by its status."""
    if status == 503 and code in NOT_READY_CODES:
        return "not_ready"
    return FAILURE_REASON_BY_STATUS.get(status, "internal" if status >= 500 else None)


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for a person to read.")
    type: str = Field(description="Error class, e.g. invalid_request_error.")
    param: str | None = Field(default=None, description="The request field at fault, if any.")
    code: str | None = Field(default=None, description="A stable machine-readable code, if any.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error the API answers with its own status code and the OpenAI envelope."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def to_response(self) -> JSONResponse:
        return error_response(
            self.status_code, self.message, param=self.param, code=self.code, headers=self.headers
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param, code="too_large")


def unsupported_media(message: str, param: str | None = None) -> APIError:
    return APIError(415, message, param=param, code="unsupported_media_type")


def not_ready(
    message: str = "The model is not ready yet; retry shortly.", code: str = "not_ready"
) -> APIError:
    headers = {"Retry-After": str(NOT_READY_RETRY_AFTER_S)}
    return APIError(503, message, code=code, headers=headers)


def overloaded(message: str = "The server is at capacity; retry shortly.") -> APIError:
    headers = {"Retry-After": str(OVERLOADED_RETRY_AFTER_S)}
    return APIError(503, message, code="overloaded", headers=headers)


def body_cap_message(limit: int) -> str:
    return f"The request body is over the limit of {limit} bytes."


def error_body(
    status_code: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status_code, "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status_code: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = error_body(status_code, message, param=param, code=code)
    return JSONResponse(body, status_code=status_code, headers=headers)


def from_engine_error(error: Exception) -> APIError:
    """Maps an error raised by `engine.submit` to the API error it stands for."""
    if isinstance(error, InvalidRequestError):
        return bad_request(str(error), param=error.param, code=error.code)
    if isinstance(error, EngineOverloadedError):
        return overloaded(str(error) or "The waiting queue is full; retry shortly.")
    if isinstance(error, EngineNotRunningError):
        return not_ready(str(error) or "The engine is not running.")
    if isinstance(error, AdapterNotFoundError):
        return APIError(404, str(error), param="model", code="model_not_found")
    if isinstance(error, AdapterLoadError):
        return bad_request(str(error), param="lora_path")
    raise error


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    parts, first_param = [], None
    for item in error.errors():
        if item.get("type") == "json_invalid":
            reason = item.get("ctx", {}).get("error", "malformed")
            return f"The body is not valid JSON: {reason}.", None
        loc = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(loc) or None
        first_param = first_param or param
        parts.append(f"{param}: {item.get('msg')}" if param else str(item.get("msg")))
    return "; ".join(parts) or "Invalid request.", first_param


async def _handle_api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    setattr(request.state, ERROR_CODE_STATE_KEY, error.code)
    return error.to_response()


async def _handle_validation(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    message, param = _validation_message(error)
    return error_response(400, message, param=param)


async def _handle_http(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    code = "too_large" if error.status_code == 413 else None
    return error_response(error.status_code, str(error.detail), code=code, headers=error.headers)


async def _handle_unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("Unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "Internal server error.", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(Exception, _handle_unexpected)


# The error statuses documented on every /v1 route of the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Body, image or prompt too large"),
        (415, "Unsupported image type"),
        (503, "Not ready, draining or overloaded; see Retry-After"),
    )
}
