"""The HTTP app: OpenAI's chat API in FastAPI routes, in front of an Engine.

    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages -> reply; `stream: true` sends server-sent events, then `data: [DONE]`
    GET  /health                 200 once the model is loaded (no key needed)

With an API key, every /v1/ route wants `Authorization: Bearer KEY`. Errors come back in OpenAI's shape
(`schema.APIError`). Generation runs in worker threads, so the event loop keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dlnotes.llm.schema import APIError, ChatRequest, parse_request, usage

if TYPE_CHECKING:
    from dlnotes.llm.engine import Engine


def create_app(engine: Engine, api_key: str = "") -> FastAPI:
    app = FastAPI(title="dlnotes serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)  # unknown path, wrong method
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").body(),
                            status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(err)).body(), status_code=400)

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):  # constant time: no timing hints
                err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": created,
                                            "owned_by": "dlnotes"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != engine.name:
            raise APIError(404, f"The model '{name}' does not exist.", "model", "model_not_found")
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "dlnotes"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"The request body is not valid JSON: {err}.") from None
        req = parse_request(body, engine.name)
        ids, budget = await run_in_threadpool(engine.check_budget, req)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": engine.name,
                 "system_fingerprint": None}
        if req.stream:
            return StreamingResponse(_events(engine, req, ids, budget, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces = await run_in_threadpool(lambda: list(engine.generate(req, ids, budget, threading.Event())))
        last = pieces[-1]
        return reply | {"object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": "".join(p.text for p in pieces)},
            "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": usage(last.prompt_tokens, last.completion_tokens)}

    return app


async def _events(engine: Engine, req: ChatRequest, ids: list[int], budget: int, reply: dict) -> AsyncIterator[str]:
    """Server-sent events: one `data: {chunk}` per piece of text, then `data: [DONE]`.

    Generation runs in a worker thread and hands pieces over through a queue; if the client goes away, the
    `finally` sets `cancel` and the worker stops at the next token, releasing the model for the next request."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def work() -> None:
        try:
            for piece in engine.generate(req, ids, budget, cancel):
                loop.call_soon_threadsafe(queue.put_nowait, piece)
        except Exception as err:  # reported to the client as an error event; the server keeps serving
            loop.call_soon_threadsafe(queue.put_nowait, err)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    def chunk(delta: dict | None, finish: str | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return f"data: {json.dumps(reply | {'object': 'chat.completion.chunk', 'choices': choices} | extra)}\n\n"

    loop.run_in_executor(None, work)
    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await queue.get()) is not None:
            if isinstance(piece, Exception):
                yield f"data: {json.dumps(APIError(500, str(piece), kind='server_error').body())}\n\n"
            elif piece.finish_reason is None:
                yield chunk({"content": piece.text})
            else:
                yield chunk({}, piece.finish_reason)
                if req.include_usage:  # OpenAI's stream_options: one last chunk with no choices, only usage
                    yield chunk(None, usage=usage(piece.prompt_tokens, piece.completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # also when the client left early: the worker stops at its next token

