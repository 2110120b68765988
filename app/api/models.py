"""GET /v1/models and GET /v1/models/{model}: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ServiceDep
from app.errors import ERROR_RESPONSES, APIError
from app.schemas import ModelCard, ModelList
from app.service import Service

router = APIRouter(tags=["models"])


def _card(service: Service) -> ModelCard:
    engine = service.engine
    max_model_len = engine.max_model_len if engine is not None else None
    return ModelCard(id=service.model_id, created=service.created, max_model_len=max_model_len)


@router.get(
    "/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="List models"
)
async def list_models(service: ServiceDep) -> ModelList:
    return ModelList(data=[_card(service)])


@router.get(
    "/v1/models/{model}", response_model=ModelCard, responses=ERROR_RESPONSES, summary="One model"
)
async def get_model(model: str, service: ServiceDep) -> ModelCard:
    if model != service.model_id:
        raise APIError(
            404, f"The model {model!r} does not exist.", param="model", code="model_not_found"
        )
    return _card(service)
