"""`create_app(settings)`: the FastAPI application and the lifespan that runs the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app import __version__
from app.api import adapters, chat, completions, health, models, vision
from app.api.middleware import GateMiddleware
from app.chat_schemas import ChatCompletionChunk
from app.config import Settings
from app.errors import install_error_handlers
from app.service import Service

if TYPE_CHECKING:
    from models.base import LoadedModel

DESCRIPTION = (
    "An OpenAI-compatible server for multimodal GPTs: text completions, chat with images, "
    "image captioning and visual question answering, with continuous batching over a paged "
    "KV cache. Errors use the OpenAI envelope `{error: {message, type, param, code}}`."
)


def create_app(settings: Settings | None = None, loaded: LoadedModel | None = None) -> FastAPI:
    """The service for `settings`; `loaded` reuses an already loaded model (tests, benches)."""
    settings = settings or Settings()
    service = Service(settings, loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /health answers and /ready says 503 meanwhile.
        loading = asyncio.create_task(service.start())
        try:
            yield
        finally:
            await loading  # a half-built engine cannot be abandoned in its thread
            await service.stop()

    app = FastAPI(title="mmgpt", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    routers = [module.router for module in (completions, chat, vision, models, adapters, health)]
    for router in routers:
        app.include_router(router)
    routes = [route for router in routers for route in router.routes]
    routes += [route for route in app.router.routes if hasattr(route, "path")]  # /docs ...
    app.add_middleware(GateMiddleware, service=service, routes=routes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with the truth about errors: 400 envelopes, never 422; bearer keys."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    needs_key = bool(app.state.service.settings.api_keys)
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if needs_key and path.startswith("/v1/"):
                operation["security"] = [{"bearerAuth": []}]
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    _add_component(components.setdefault("schemas", {}), ChatCompletionChunk)  # chat streams
    if needs_key:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = schema
    return schema


def _add_component(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    """A model that only event streams refer to, with the models it nests, as components."""
    found = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, nested in found.pop("$defs", {}).items():
        schemas.setdefault(name, nested)
    schemas.setdefault(model.__name__, found)
