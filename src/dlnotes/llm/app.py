"""The HTTP app: OpenAI's chat API in FastAPI routes, in front of an Engine.

    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages -> reply; `stream: true` sends server-sent events, then `data: [DONE]`
    GET  /health                 200 once the model is loaded (no key needed)

Errors come back in OpenAI's shape (`schema.APIError`), never as an exception's own text. Before a request
reaches a route, `Guard` checks what a browser page could forge: the Host header (a DNS-rebinding page
names its own host), the Origin header when there is one, a JSON content type on POST (a plain form or
`text/plain` fetch cannot send one without asking first), and the API key on /v1/ routes.

A chat request then goes: body (413 beyond `Limits.max_body`, before parsing) -> JSON and fields (400s) ->
admission (503 with Retry-After when `Limits.queue` requests already wait) -> prompt length (400) -> its
`Turn`: a thread that waits for the model, then decodes, handing pieces to the event loop. If the client
goes away, streaming or not, the turn is cancelled and the model is free again at the next token.

Tools: a reply that may be a tool call (`tools.offered`) is read whole before anything is sent, then
comes back as `tool_calls` (finish_reason "tool_calls") or as content; streamed, it is one chunk of either
(as Ollama does), since a call is only known to be one once it parses. JSON replies stream as they come.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from dlnotes.llm.schema import APIError, ChatRequest, Limits, parse_json, parse_request, usage
from dlnotes.llm.tools import offered, parse_reply

if TYPE_CHECKING:
    from dlnotes.llm.engine import Engine, Piece

log = logging.getLogger("dlnotes.serve")
END = object()  # a turn's last item: its thread is done and the model is free


def create_app(engine: Engine, api_key: str = "", limits: Limits = Limits(), bind_host: str = "127.0.0.1") -> FastAPI:
    app = FastAPI(title="dlnotes serve", docs_url=None, redoc_url=None, openapi_url=None)
    # CORS headers let an allowed page (a loopback one, or --allow-origin) read replies and send its JSON
    # preflight; Guard, added last and so run first, has already refused every other origin.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(Guard, api_key=api_key, bind_host=bind_host, limits=limits)
    created = int(time.time())
    admission = Admission(limits.queue)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(HTTPException)  # unknown path, wrong method
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}"))

    @app.exception_handler(Exception)  # a bug: logged with its traceback, the client gets no internals
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return _error(APIError(500, "The server failed on this request; its log says why.", kind="server_error"))

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
            raise APIError(404, f"The model '{name[:80]}' does not exist.", "model", "model_not_found")
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "dlnotes"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request, limits.max_body)
        req = parse_request(await run_in_threadpool(parse_json, body), engine.name)
        admission.enter()  # a 503 when the queue is full, before any tokenizing
        deadline = time.monotonic() + limits.timeout
        try:
            ids, budget = await run_in_threadpool(engine.check_budget, req, limits.max_tokens)
            if req.grammar is not None:
                await run_in_threadpool(_check_grammar, engine, req, budget)
        except BaseException:
            admission.leave(None)
            raise
        turn = Turn(engine, req, ids, budget, deadline, done=admission.leave)
        watcher = asyncio.create_task(_watch_disconnect(request, turn.cancel))
        streaming = False
        try:
            if await turn.get() is END:  # the client left while waiting: nobody reads what comes back
                return Response(status_code=499)
            reply = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": engine.name,
                     "system_fingerprint": None}
            if req.stream:  # from here StreamingResponse watches the client, and cancels the turn when it leaves
                streaming = True
                return StreamingResponse(_events(turn, req, reply), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"},
                                         background=BackgroundTask(turn.cancel.set))
            pieces = []
            while (piece := await turn.get()) is not END:
                pieces.append(piece)
            if turn.cancel.is_set() or not pieces:  # the client left mid-way
                return Response(status_code=499)
            last = pieces[-1]
            message, finish = _message("".join(p.text for p in pieces), req, last.finish_reason)
            return reply | {"object": "chat.completion", "choices": [{
                "index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage(last.prompt_tokens, last.completion_tokens)}
        finally:
            watcher.cancel()
            if not streaming:
                turn.cancel.set()  # a no-op when the turn is over; else (an error here) it frees the model

    return app


def _check_grammar(engine: Engine, req: ChatRequest, budget: int) -> None:
    """A constrained reply must be writable: byte tokens to spell any JSON, and room for the shortest value."""
    from dlnotes.llm.guide import spells, vocabulary

    if not spells(vocabulary(engine.loaded.tokenizer, engine.loaded.model.config.vocab_size), req.grammar):
        raise APIError(400, "This model's vocabulary lacks single-byte tokens that constrained decoding "
                       "(response_format, tool_choice) needs to finish the JSON.", "response_format")
    if budget < req.grammar.min_size:
        raise APIError(400, f"max_tokens is {budget}; the shortest JSON the schema allows needs "
                       f"{req.grammar.min_size}.", "max_tokens")


def _message(text: str, req: ChatRequest, finish: str) -> tuple[dict[str, Any], str]:
    """The reply's message and finish_reason: tool calls when the tools were offered and the text holds valid
    ones, else the text."""
    if offered(req):
        content, calls = parse_reply(text, req)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": content}, finish
    return {"role": "assistant", "content": text}, finish


# --- before the routes: what a browser page could forge --------------------------------------------------------


class Guard:
    """ASGI middleware: Host, Origin, API key and content type, checked before any route runs.

    Host: the bind address, plus the loopback names when bound to loopback, plus `--allow-host` (`*` = any).
    Bound to all interfaces (0.0.0.0, ::), any Host passes unless `--allow-host` is given, as in Ollama.
    Origin (sent by browsers only): a page from loopback or from an allowed host, plus `--allow-origin`."""

    def __init__(self, app: Any, api_key: str, bind_host: str, limits: Limits) -> None:
        self.app, self.api_key = app, api_key
        bind = _host_name(bind_host)
        wildcard = bind in ("0.0.0.0", "::", "")
        self.hosts = {bind} | {_host_name(h) for h in limits.allow_hosts}
        if _is_loopback(bind) or wildcard:
            self.hosts |= {"localhost", "127.0.0.1", "::1"}
        self.any_host = "*" in limits.allow_hosts or (wildcard and not limits.allow_hosts)
        self.origins = {o.lower().rstrip("/") for o in limits.allow_origins}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (err := self.check(scope)) is not None:
            await _error(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope: Any) -> APIError | None:
        headers = Headers(scope=scope)
        host = _host_name(headers.get("host", ""))
        if not self.any_host and host not in self.hosts:
            return APIError(403, f"Host {host[:80]!r} is not allowed (a web page may be posing as it); "
                            "start the server with --allow-host NAME to accept it.", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin):
            return APIError(403, f"Origin {origin[:80]!r} is not allowed; start the server with --allow-origin "
                            "ORIGIN to accept requests from that web page.", code="origin_not_allowed")
        if self.api_key and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":  # a preflight has no key
            given = headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):  # constant time: no timing hints
                return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return APIError(415, f"Content-Type must be application/json, got {kind[:80]!r}.",
                                code="unsupported_media_type")
        return None

    def origin_allowed(self, origin: str) -> bool:
        origin = origin.lower().rstrip("/")
        if "*" in self.origins or origin in self.origins:
            return True
        try:
            parts = urlsplit(origin)
            name = parts.hostname or ""
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and (_is_loopback(name) or name in self.hosts)


def _host_name(value: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def read_body(request: Request, cap: int) -> bytes:
    """The body, or a 413 as soon as it is longer than `cap` bytes (by its Content-Length, or as it arrives)."""
    too_large = APIError(413, f"The request body is larger than {cap} bytes (the server's --max-body).",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise too_large
    return bytes(body)


# --- admission and turns ----------------------------------------------------------------------------------------


class Admission:
    """At most one request generating and `queue` waiting; beyond that a 503 with Retry-After, as Ollama's
    bounded queue does. A request counts until its thread gives the model back (an abandoned one too)."""

    def __init__(self, queue: int) -> None:
        self.limit, self.count, self.turn_s = queue + 1, 0, 1.0  # turn_s: recent seconds a turn took

    def enter(self) -> None:
        if self.count >= self.limit:
            wait = max(1, math.ceil(self.turn_s))  # a place frees up when the current turn ends
            raise APIError(503, f"The server is busy ({self.count - 1} requests waiting for the model); retry in "
                           f"{wait} s.", code="server_busy", kind="server_error", headers={"Retry-After": str(wait)})
        self.count += 1

    def leave(self, turn_s: float | None) -> None:  # on the event loop
        self.count -= 1
        if turn_s is not None:
            self.turn_s = 0.8 * self.turn_s + 0.2 * turn_s


class Turn:
    """One request's generation in a thread of its own. It waits for the model, then hands the event loop
    a start signal, the pieces and `END` once the model is free again; or an APIError (then `END`)."""

    def __init__(self, engine: Engine, req: ChatRequest, ids: list[int], budget: int, deadline: float,
                 done: Any) -> None:
        self.cancel = threading.Event()  # set when the client leaves: the thread stops at the next token
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.engine, self.deadline, self.done = engine, deadline, done
        self.args = (req, ids, budget, self.cancel, deadline)
        threading.Thread(target=self._work, name="dlnotes-turn", daemon=True).start()

    async def get(self) -> Any:
        """The next item: the start signal (any object but END), a Piece, or END; raises the turn's APIError."""
        item = await self.queue.get()
        if isinstance(item, APIError):
            raise item
        return item

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def _work(self) -> None:
        engine, started = self.engine, None
        try:
            if engine.wait_turn(self.cancel, self.deadline):
                started = time.monotonic()
                try:
                    self._put(True)  # holding the model: the reply can start
                    for piece in engine.decode(*self.args):
                        self._put(piece)
                finally:
                    engine.lock.release()
        except APIError as err:  # the deadline passed while waiting
            self._put(err)
        except Exception:  # a bug: logged, the client gets no internals, the server keeps serving
            log.exception("generation failed")
            self._put(APIError(500, "The server failed while generating; its log says why.", kind="server_error"))
        finally:
            self._put(END)
            try:
                self.loop.call_soon_threadsafe(self.done, None if started is None else time.monotonic() - started)
            except RuntimeError:
                pass


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client goes away (the body is read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


async def _events(turn: Turn, req: ChatRequest, reply: dict) -> AsyncIterator[str]:
    """Server-sent events: one `data: {chunk}` per piece of text, then `data: [DONE]`."""

    def chunk(delta: dict | None, finish: str | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return f"data: {json.dumps(reply | {'object': 'chat.completion.chunk', 'choices': choices} | extra)}\n\n"

    held: list[str] | None = [] if offered(req) else None  # a reply that may be a tool call is sent whole
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                piece: Piece = await turn.get()
            except APIError as err:  # reported to the client as an error event; the server keeps serving
                yield f"data: {json.dumps(err.body())}\n\n"
                continue
            if piece is END:
                break
            if piece.finish_reason is None:
                if held is None:
                    yield chunk({"content": piece.text})
                else:
                    held.append(piece.text)
            else:
                finish = piece.finish_reason
                if held is not None:
                    message, finish = _message("".join(held), req, finish)
                    if message.get("tool_calls"):
                        yield chunk({"tool_calls": [{"index": k} | c for k, c in enumerate(message["tool_calls"])]})
                    elif message["content"]:
                        yield chunk({"content": message["content"]})
                yield chunk({}, finish)
                if req.include_usage:  # OpenAI's stream_options: one last chunk with no choices, only usage
                    yield chunk(None, usage=usage(piece.prompt_tokens, piece.completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        turn.cancel.set()  # also when the client left early: the thread stops at its next token
