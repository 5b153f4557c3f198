"""An OpenAI-compatible chat server for a local model: what Ollama or llama.cpp's server do, in one file.

    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages -> reply; `stream: true` sends server-sent events, then `data: [DONE]`
    GET  /health                 200 once the model is loaded (no key needed)

Any OpenAI client talks to it: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`. Errors come back
in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status, and the server
keeps serving. Generation is serialized by a lock: one model, one KV cache at a time; a second request
waits for the first instead of mixing its tokens into it.

The decoding loop is written out (no `model.generate`): prefill the prompt once, then one token per forward
pass reusing the KV cache, sampling with temperature and top-p, decoding text incrementally so multi-byte
characters are never cut, and holding back text that might be the start of a stop string. The forward
passes are `llm.decoder_for`'s: on the CPU a hand-written, compiled llama step (see llm.LlamaDecoder).

Measured with `dlnotes run llm-chat --prompt ... --temperature 0 --max-tokens 200` on a 2-core AMD EPYC VM
(SmolLM2-135M-Instruct, quiet machine, 3 prompts, 200 tokens each): 49-54 tokens/s through HTTP and the
`openai` client (~55 without them), time to first token 0.16-0.20 s; transformers' forward with fp16
weights gave 20-23 tokens/s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dlnotes.errors import UserError

if TYPE_CHECKING:
    from dlnotes.llm import LoadedModel

ROLES = {"system", "developer", "user", "assistant"}  # developer is OpenAI's newer name for system


class APIError(Exception):
    """Becomes `{"error": {...}}` with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- the request ----------------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def parse_request(body: Any, served: str) -> ChatRequest:
    """Check a /v1/chat/completions body the way OpenAI does; every problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    if body.get("model") != served:
        raise APIError(404, f"The model '{body.get('model')}' does not exist; this server serves '{served}'.",
                       "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects.", "messages")
    chat = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role is {role!r}; use one of system, user, assistant.",
                           f"messages[{i}].role")
        chat.append({"role": "system" if role == "developer" else role,
                     "content": _text_content(message.get("content"), i)})
    req = ChatRequest(messages=chat)
    req.max_tokens = _number(body, "max_completion_tokens", int, None) or _number(body, "max_tokens", int, None)
    if req.max_tokens is not None and req.max_tokens <= 0:
        raise APIError(400, f"max_tokens must be at least 1, got {req.max_tokens}.", "max_tokens")
    req.temperature = _number(body, "temperature", float, 1.0)
    if not 0 <= req.temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {req.temperature}.", "temperature")
    req.top_p = _number(body, "top_p", float, 1.0)
    if not 0 < req.top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}.", "top_p")
    req.seed = _number(body, "seed", int, None)
    if body.get("n", 1) not in (1, None):
        raise APIError(400, "Only n=1 is supported.", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings.", "stop")
    req.stop = stop
    req.stream = bool(body.get("stream", False))
    req.include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    return req


def _text_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)  # [{"type": "text", "text": ...}, ...]
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts.", f"messages[{i}].content")


def _number(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise APIError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}.", name)
    return kind(value)


# --- generation -----------------------------------------------------------------------------------------------


@dataclass
class Piece:
    text: str
    finish_reason: str | None = None  # set on the last piece: "stop" or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine:
    """One loaded model and the lock that makes requests take turns."""

    def __init__(self, loaded: LoadedModel) -> None:
        import torch

        from dlnotes import llm

        self.loaded = loaded
        self.name = loaded.name
        self.lock = threading.Lock()
        self.device = next(loaded.model.parameters()).device
        config_eos = getattr(loaded.model.generation_config, "eos_token_id", None)
        eos = [loaded.tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])]
        self.eos = {int(t) for t in eos if t is not None}
        self.torch = torch
        self.decoder = llm.decoder_for(loaded.model)  # on the CPU this compiles the decoding step: seconds

    def prompt_ids(self, req: ChatRequest) -> list[int]:
        text = self.loaded.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
        return self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has the specials

    def check_budget(self, req: ChatRequest) -> tuple[list[int], int]:
        """The prompt's ids and the number of tokens it may generate; a 400 when it cannot fit the context."""
        context = self.loaded.context
        ids = self.prompt_ids(req)
        if req.max_tokens is not None and req.max_tokens > context:
            raise APIError(400, f"max_tokens is {req.max_tokens}, but the model's context is {context} tokens.",
                           "max_tokens", "context_length_exceeded")
        if len(ids) >= context:
            raise APIError(400, f"The prompt is {len(ids)} tokens; the model's context is {context} tokens. "
                           "Shorten the messages.", "messages", "context_length_exceeded")
        budget = req.max_tokens if req.max_tokens is not None else context - len(ids)
        if len(ids) + budget > context:
            raise APIError(400, f"The prompt is {len(ids)} tokens, and {len(ids)} + max_tokens {budget} is more than "
                           f"the model's context of {context} tokens. Lower max_tokens.",
                           "max_tokens", "context_length_exceeded")
        return ids, budget

    def generate(self, req: ChatRequest, ids: list[int], budget: int, cancel: threading.Event) -> Iterator[Piece]:
        """Text pieces as they are decoded; the last piece carries finish_reason and the token counts."""
        with self.lock, self.torch.inference_mode():
            yield from self._generate(req, ids, budget, cancel)

    def _generate(self, req: ChatRequest, ids: list[int], budget: int, cancel: threading.Event) -> Iterator[Piece]:
        torch, decoder, tokenizer = self.torch, self.decoder, self.loaded.tokenizer
        generator = torch.Generator(self.device)
        generator.manual_seed(req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:6], "big"))
        out: list[int] = []
        emitted = ""  # the part of the reply already sent
        text = Detokenizer(tokenizer)
        finish, hit_stop = "length", False
        logits = decoder.prefill(ids, max_len=len(ids) + budget)  # (V,): the whole prompt in one pass
        while not cancel.is_set():
            token = sample(logits, req.temperature, req.top_p, generator)
            if token in self.eos:
                finish = "stop"
                break
            out.append(token)
            full = text.add(token)
            cut = _find_stop(full, req.stop, len(emitted))
            if cut is not None:  # a stop string: the reply ends just before it
                finish, hit_stop = "stop", True
                if cut > len(emitted):
                    yield Piece(full[len(emitted):cut])
                break
            safe = len(full) - _stop_prefix_len(full, req.stop)  # hold back what may be the start of a stop string
            if safe > len(emitted):
                yield Piece(full[len(emitted):safe])
                emitted = full[:safe]
            if len(out) == budget:
                break
            logits = decoder.step(token)  # (V,): one token through the model, the cache holds all before it
        if not hit_stop and not cancel.is_set():
            rest = text.flush()  # held-back text, or an unfinished character at the very end
            if len(rest) > len(emitted):
                yield Piece(rest[len(emitted):])
        yield Piece("", finish, prompt_tokens=len(ids), completion_tokens=len(out))


def sample(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    """Next token from (V,) logits: greedy at temperature 0, else softmax(logits / T) cut to the top-p mass."""
    import torch

    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)  # (V,)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # tokens after the nucleus is already full
        sorted_probs[outside] = 0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class Detokenizer:
    """Incremental decoding: the text so far after each token, never with half a UTF-8 character.

    Decoding each token alone breaks words ("▁Par" "is") and characters spread over several byte tokens;
    decoding a short window of recent tokens and keeping what it added (the trick of Hugging Face's
    text-generation-inference) does not, and costs the same for every token however long the reply."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.prefix, self.read, self.text = tokenizer, [], 0, 0, ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):  # U+FFFD: an unfinished character
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Where the first stop string begins in `text`, searching only what is new since `start`."""
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


# --- the HTTP app ---------------------------------------------------------------------------------------------


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
            "logprobs": None, "finish_reason": last.finish_reason}], "usage": _usage(last)}

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
                    yield chunk(None, usage=_usage(piece))
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # also when the client left early: the worker stops at its next token


def _usage(last: Piece) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


# --- running it -----------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts: a busy port is a clear error, port 0 a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"Cannot listen on {host}:{port}: {err.strerror} (pick another --port).") from err
    sock.listen(128)
    return sock


def load_engine(model: str = "", device: str = "auto", tiny: bool = False) -> Engine:
    """The model (or the tiny random one) behind an Engine. This is where torch is first imported."""
    # OpenMP threads that wait for work sleep instead of spinning. On a machine busy with other jobs, spinning
    # threads hold the cores their partner thread needs: 0.3 tokens/s instead of 15 was measured here with
    # 2 threads next to other training runs. Only takes effect if torch was not imported yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from dlnotes import llm
    from dlnotes.device import pick_device

    return Engine(llm.tiny_model() if tiny else llm.load(model, str(pick_device(device))))


class BackgroundServer:
    """The server on a free loopback port in a thread of this process: `with BackgroundServer(engine) as url:`."""

    def __init__(self, engine: Engine, api_key: str = "", host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}/v1"
        config = uvicorn.Config(create_app(engine, api_key), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the embedded server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(model: str = "", host: str = "127.0.0.1", port: int = 8000, api_key: str = "", device: str = "auto") -> None:
    """`dlnotes serve`: load the model, then serve until Ctrl+C."""
    import uvicorn

    sock = bind(host, port)  # before loading: a busy port fails in a second, not after the model loads
    engine = load_engine(model, device)
    where = f"http://{host}:{sock.getsockname()[1]}/v1"  # the real port, also when --port 0 picked one
    print(f"Serving {engine.name} at {where} (OpenAI-compatible). Ctrl+C stops.", flush=True)
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: listening beyond this machine with no --api-key: anyone who can reach it can use it.")
    uvicorn.Server(uvicorn.Config(create_app(engine, api_key), log_level="info")).run(sockets=[sock])
