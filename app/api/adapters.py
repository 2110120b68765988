"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names and bodies).

Off unless `allow_runtime_lora` is set; then an adapter is read only from inside one of
`lora_dirs`. The path a request gives is resolved (symlinks followed, `..` collapsed)
before the check, so no request makes the server open a folder of its choosing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.api.deps import RuntimeDep
from app.config import Settings
from app.engine.errors import EngineError
from app.errors import ERROR_RESPONSES, APIError, ErrorResponse, bad_request, from_engine_error

router = APIRouter(tags=["adapters"])
MAX_NAME_CHARS = 128
RESPONSES = {
    **ERROR_RESPONSES,
    403: {"model": ErrorResponse, "description": "Loading adapters at run time is off"},
}


class LoadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)


class LoraAdapterStatus(BaseModel):
    object: str = "lora_adapter"
    id: str
    status: str  # "loaded", or "unloaded" (requests in flight finish with it first)


@router.post(
    "/v1/load_lora_adapter",
    response_model=LoraAdapterStatus,
    responses=RESPONSES,
    summary="Load a LoRA adapter from inside the allowed folders",
)
async def load_lora_adapter(body: LoadLoraAdapterRequest, runtime: RuntimeDep) -> LoraAdapterStatus:
    _check_allowed(runtime.settings)
    if body.lora_name == runtime.model_id:
        raise bad_request("An adapter cannot take the base model's name.", "lora_name")
    folder = allowed_path(body.lora_path, runtime.settings.lora_dirs)
    try:
        await runtime.engine.load_adapter(body.lora_name, str(folder))
    except EngineError as error:
        raise from_engine_error(error) from None
    return LoraAdapterStatus(id=body.lora_name, status="loaded")


@router.post(
    "/v1/unload_lora_adapter",
    response_model=LoraAdapterStatus,
    responses=RESPONSES,
    summary="Unload a LoRA adapter; its requests in flight finish first",
)
async def unload_lora_adapter(
    body: UnloadLoraAdapterRequest, runtime: RuntimeDep
) -> LoraAdapterStatus:
    _check_allowed(runtime.settings)
    try:
        await runtime.engine.unload_adapter(body.lora_name)
    except EngineError as error:
        refusal = from_engine_error(error)
        refusal.param = "lora_name"
        raise refusal from None
    return LoraAdapterStatus(id=body.lora_name, status="unloaded")


def _check_allowed(settings: Settings) -> None:
    if not settings.allow_runtime_lora:
        raise APIError(
            403,
            "Loading adapters at run time is off; start the server with "
            "MMGPT_ALLOW_RUNTIME_LORA=true and MMGPT_LORA_DIRS.",
            code="runtime_lora_disabled",
        )


def allowed_path(requested: str, roots: list[str]) -> Path:
    """The folder `requested` names, resolved, when it lies inside one of `roots` (a relative
    path is taken inside each root in turn); otherwise a 400 that names no server path."""
    for root in (Path(root).resolve() for root in roots):
        try:
            candidate = (root / requested).resolve()  # an absolute `requested` replaces the root
            if candidate.is_relative_to(root) and candidate.is_dir():
                return candidate
        except (OSError, ValueError):  # a NUL byte, a name too long, a symlink loop
            continue
    raise bad_request(
        "lora_path must name a folder inside the server's adapter folders (MMGPT_LORA_DIRS).",
        "lora_path",
    )
