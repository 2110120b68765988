"""GET /health (alive), GET /ready (serving), GET /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.api.deps import ServiceDep
from app.errors import ERROR_RESPONSES, not_ready
from app.schemas import HealthStatus

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthStatus, summary="The process is alive")
async def health(service: ServiceDep) -> HealthStatus:
    return HealthStatus(status="ok", detail=service.status.value)


@router.get(
    "/ready",
    response_model=HealthStatus,
    responses={503: ERROR_RESPONSES[503]},
    summary="The model is loaded and the engine loop runs; 503 otherwise",
)
async def ready(service: ServiceDep) -> HealthStatus:
    if not service.is_ready:
        raise not_ready(service.not_ready_reason())
    return HealthStatus(status="ready")


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus metrics"}},
    summary="Prometheus metrics",
)
async def prometheus_metrics() -> Response:
    """The engine's gauges are as of its last step or abort: it records them at each."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
