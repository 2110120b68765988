"""A naive OpenAI-compatible server: FastAPI around `generate()` under a lock.

    python -m bench.peers.naive --model PATH --host 127.0.0.1 --port 8001

Routes: /v1/completions, /v1/chat/completions (SSE when `stream`), /v1/models,
/health and /ready. Requests are served strictly one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench.peers.naive_model import GenerationRequest, NaiveGenerator, TokenQueueStreamer


def _run_generate(generator: NaiveGenerator, request: GenerationRequest, streamer: Any) -> None:
    try:
        generator.generate(request, streamer)
    finally:
        streamer.end()  # the reader must wake up even when generate() raised


class TokenStream:
    """Runs one generation in a worker thread; iterating yields each token's new text.

    Partial UTF-8 characters are held back until complete; `num_tokens` counts them all.
    """

    def __init__(self, generator: NaiveGenerator, request: GenerationRequest) -> None:
        self.generator = generator
        self.request = request
        self.num_tokens = 0

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        streamer = TokenQueueStreamer(loop, queue)
        job = asyncio.create_task(
            asyncio.to_thread(_run_generate, self.generator, self.request, streamer)
        )
        token_ids: list[int] = []
        emitted = ""
        while (token_id := await queue.get()) is not None:
            token_ids.append(token_id)
            self.num_tokens = len(token_ids)
            text = self.generator.decode(token_ids)
            if not text.endswith("\ufffd"):
                yield text[len(emitted) :]
                emitted = text
        await job


def _generation_request(body: dict[str, Any], inputs: dict[str, torch.Tensor]) -> GenerationRequest:
    return GenerationRequest(
        inputs=inputs,
        max_tokens=int(body.get("max_tokens") or 16),
        temperature=float(body.get("temperature", 1.0)),
        top_p=float(body.get("top_p", 1.0)),
        ignore_eos=bool(body.get("ignore_eos", False)),
        seed=body.get("seed"),
    )


def _choice(chat: bool, text: str, finish: str | None) -> dict[str, Any]:
    if chat:
        return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return {"index": 0, "text": text, "finish_reason": finish}


def _usage(request: GenerationRequest, completion_tokens: int) -> dict[str, int]:
    prompt = request.prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


class Responder:
    """Turns one generation into OpenAI chunks (SSE) or one OpenAI response."""

    def __init__(self, generator: NaiveGenerator, body: dict[str, Any], chat: bool) -> None:
        self.generator = generator
        self.body = body
        self.chat = chat
        self.id = f"naive-{uuid.uuid4().hex}"
        self.object = "chat.completion" if chat else "text_completion"

    def envelope(self, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "created": int(time.time()), "model": self.generator.name} | fields

    async def sse(self, request: GenerationRequest) -> AsyncIterator[str]:
        chunk_object = self.object + (".chunk" if self.chat else "")
        tokens = TokenStream(self.generator, request)
        async for text in tokens:
            if text:
                chunk = self.envelope(object=chunk_object, choices=[_choice(self.chat, text, None)])
                yield f"data: {json.dumps(chunk)}\n\n"
        count = tokens.num_tokens
        finish = "length" if count >= request.max_tokens else "stop"
        last = self.envelope(object=chunk_object, choices=[_choice(self.chat, "", finish)])
        yield f"data: {json.dumps(last)}\n\n"
        if (self.body.get("stream_options") or {}).get("include_usage"):
            usage = self.envelope(object=chunk_object, choices=[], usage=_usage(request, count))
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"

    async def whole(self, request: GenerationRequest) -> dict[str, Any]:
        tokens = TokenStream(self.generator, request)
        text = "".join([piece async for piece in tokens])
        count = tokens.num_tokens
        finish = "length" if count >= request.max_tokens else "stop"
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if self.chat
            else _choice(False, text, finish)
        )
        return self.envelope(object=self.object, choices=[choice], usage=_usage(request, count))

    async def respond(self, inputs: dict[str, torch.Tensor]) -> Any:
        request = _generation_request(self.body, inputs)
        if self.body.get("stream"):
            return StreamingResponse(self.sse(request), media_type="text/event-stream")
        return JSONResponse(await self.whole(request))


def _prompt_text(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise HTTPException(400, "prompt must be one string")
    return prompt


def create_app(generator: NaiveGenerator) -> FastAPI:
    app = FastAPI(title="naive generate() server")

    @app.get("/health")
    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": generator.name, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(http_request: Request) -> Any:
        body = await http_request.json()
        inputs = generator.completion_inputs(_prompt_text(body))
        return await Responder(generator, body, chat=False).respond(inputs)

    @app.post("/v1/chat/completions")
    async def chat(http_request: Request) -> Any:
        body = await http_request.json()
        inputs = generator.chat_inputs(body["messages"])
        return await Responder(generator, body, chat=True).respond(inputs)

    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    app = create_app(NaiveGenerator(args.model, args.dtype, args.device))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
