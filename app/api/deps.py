"""Dependencies shared by the routes, in one place."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import APIError
from app.service import Runtime, Service

# Both are coroutines although neither waits for anything: FastAPI runs a plain `def`
# dependency in a worker thread, a round trip per request and per dependency.


async def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def get_runtime(service: Annotated[Service, Depends(get_service)]) -> Runtime:
    """The loaded model and engine, or a 503 (loading, draining, failed)."""
    return service.runtime()


ServiceDep = Annotated[Service, Depends(get_service)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def check_model(runtime: Runtime, requested: str | None) -> str | None:
    """The LoRA adapter a request names in `model`, or None for the base model (named or
    omitted); any other name is a 404."""
    if requested is None or requested == runtime.model_id:
        return None
    if requested in runtime.engine.adapter_names:
        return requested
    raise model_not_found(requested, runtime.model_id)


def model_not_found(requested: str, served: str) -> APIError:
    return APIError(
        404,
        f"The model {requested!r} does not exist; this server serves {served!r} and its adapters "
        "(GET /v1/models).",
        param="model",
        code="model_not_found",
    )
