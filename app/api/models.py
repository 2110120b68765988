"""GET /v1/models and GET /v1/models/{model}: the served model and its LoRA adapters."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ServiceDep, model_not_found
from app.errors import ERROR_RESPONSES
from app.schemas import ModelCard, ModelList
from app.service import Service

router = APIRouter(tags=["models"])


def _cards(service: Service) -> list[ModelCard]:
    engine, base = service.engine, service.model_id
    max_model_len = engine.max_model_len if engine is not None else None
    cards = [ModelCard(id=base, created=service.created, max_model_len=max_model_len, root=base)]
    for name in engine.adapter_names if engine is not None else []:
        card = ModelCard(
            id=name, created=service.created, max_model_len=max_model_len, root=base, parent=base
        )
        cards.append(card)
    return cards


@router.get(
    "/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="List models"
)
async def list_models(service: ServiceDep) -> ModelList:
    return ModelList(data=_cards(service))


@router.get(
    "/v1/models/{model}", response_model=ModelCard, responses=ERROR_RESPONSES, summary="One model"
)
async def get_model(model: str, service: ServiceDep) -> ModelCard:
    for card in _cards(service):
        if card.id == model:
            return card
    raise model_not_found(model, service.model_id)
