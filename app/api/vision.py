"""POST /v1/caption and POST /v1/qa: one uploaded image, answered in the completions shape."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import Response

from app.api.completions import TextRenderer
from app.api.deps import RuntimeDep, check_model
from app.api.generation import Job, new_request_id, respond, sampling_defaults, submit
from app.api.images import load_upload
from app.api.sse import streamed_ok
from app.engine.sequence import ImageInput
from app.errors import ERROR_RESPONSES
from app.schemas import CaptionForm, CompletionResponse, QAForm, VisionForm
from app.service import Runtime

router = APIRouter(tags=["vision"])


@router.post(
    "/v1/caption",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, **streamed_ok(CompletionResponse)},
    summary="Caption an uploaded image (multipart/form-data)",
)
async def caption(
    form: Annotated[CaptionForm, Form(media_type="multipart/form-data")],
    request: Request,
    runtime: RuntimeDep,
) -> Response:
    adapter = check_model(runtime, form.model)
    image = await load_upload(runtime, form.image)
    builder = runtime.prompts
    prompt_ids = await builder.run(
        len(form.prompt or "") + len(image.prompt_text),
        builder.caption,
        form.prompt,
        image.placeholder,
    )
    job = _job(runtime, form, "caption", prompt_ids, image, "prompt", adapter)
    return await _describe(request, runtime, form, job)


@router.post(
    "/v1/qa",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, **streamed_ok(CompletionResponse)},
    summary="Answer a question about an uploaded image (multipart/form-data)",
)
async def answer(
    form: Annotated[QAForm, Form(media_type="multipart/form-data")],
    request: Request,
    runtime: RuntimeDep,
) -> Response:
    adapter = check_model(runtime, form.model)
    image = await load_upload(runtime, form.image)
    builder = runtime.prompts
    prompt_ids = await builder.run(
        len(form.question) + len(image.prompt_text),
        builder.question,
        form.question,
        image.placeholder,
    )
    job = _job(runtime, form, "qa", prompt_ids, image, "question", adapter)
    return await _describe(request, runtime, form, job)


def _job(
    runtime: Runtime,
    form: VisionForm,
    endpoint: str,
    prompt_ids: list[int],
    image: ImageInput,
    prompt_param: str,
    adapter: str | None,
) -> Job:
    defaults = sampling_defaults(runtime)
    params = form.to_sampling_params(defaults, defaults.rest_of_context(len(prompt_ids)))
    request_id = new_request_id(endpoint)
    model = adapter or runtime.model_id
    return Job(endpoint, request_id, model, [prompt_ids], params, [image], prompt_param, adapter)


async def _describe(request: Request, runtime: Runtime, form: VisionForm, job: Job) -> Response:
    streams, usage = submit(runtime, job), form.stream_include_usage
    return await respond(
        request, job, streams, TextRenderer(job), stream=form.stream, include_usage=usage
    )
