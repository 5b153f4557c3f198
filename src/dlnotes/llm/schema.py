"""The HTTP schema of /v1/chat/completions: the request checked the way OpenAI checks it, and errors in its shape.

    request   {"model", "messages": [{"role", "content"}], "max_tokens" | "max_completion_tokens",
               "temperature", "top_p", "stop", "seed", "n": 1, "stream", "stream_options": {"include_usage"}}
    error     {"error": {"message", "type", "param", "code"}} with a 4xx status (APIError)
    usage     {"prompt_tokens", "completion_tokens", "total_tokens"}
    limits    what the server accepts (`Limits`, the flags of `dlnotes serve`)

Every problem with a request is a 4xx naming the field (404 for an unknown model), never a 500 and never an
exception's own text, and the server keeps serving. The body is parsed by `parse_json`, which refuses deep
nesting before Python's recursive parser sees it, and NaN, Infinity or numbers too large for a float.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

ROLES = {"system", "developer", "user", "assistant"}  # developer is OpenAI's newer name for system
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 64  # the text held back and searched each token is at most this long (a stop is a few characters)
MAX_DEPTH = 32  # JSON nesting: a chat request is 4 deep ({"messages": [{"content": [{...}]}]})
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class Limits:
    """What one server accepts; the defaults are `dlnotes serve`'s."""
    max_body: int = 1 << 20  # bytes of a request body: a long chat is tens of kB; refused (413) before parsing
    max_tokens: int = 2048  # the largest max_tokens a request may ask for; also the budget when it gives none
    queue: int = 16  # requests that may wait for the model while one generates; more are answered 503
    timeout: float = 600.0  # seconds per request, waiting included; the reply ends there ("length")
    allow_hosts: tuple[str, ...] = ()  # Host names accepted beyond the bind address ("*": any)
    allow_origins: tuple[str, ...] = ()  # browser origins accepted beyond loopback pages ("*": any)


class APIError(Exception):
    """Becomes `{"error": {...}}` with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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


def parse_json(body: bytes) -> Any:
    """The request body as JSON; a 400 for anything else, for nesting deeper than MAX_DEPTH (Python's parser
    recurses: 10,000 nested lists would crash it), and for NaN, Infinity or a number beyond a float's range."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "The request body is not UTF-8 text.") from None
    if _too_deep(text):
        raise APIError(400, f"The request body nests JSON more than {MAX_DEPTH} levels deep.")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except APIError:
        raise
    except (ValueError, RecursionError) as err:  # ValueError covers JSONDecodeError and over-long integers
        where = f" (line {err.lineno}, column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        raise APIError(400, f"The request body is not valid JSON{where}.") from None


# A JSON string (brackets inside it do not nest), or an unterminated one up to the end: possessive, so the
# scan is linear even for a body of unterminated strings.
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_OPENERS = re.compile(r"[\[{]{" + str(MAX_DEPTH + 1) + "}")
_PAIR = re.compile(r"[\[{][\]}]")  # an innermost pair: removing all of them peels one level


def _too_deep(text: str) -> bool:
    """Whether brackets outside strings nest deeper than MAX_DEPTH: a few regex passes, no recursion."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if brackets.count("[") + brackets.count("{") <= MAX_DEPTH:
        return False  # the common case: too few brackets to nest too deep
    if _OPENERS.search(brackets):
        return True  # the usual attack, [[[[..., found in one pass
    for _ in range(MAX_DEPTH):
        brackets, peeled = _PAIR.subn("", brackets)
        if not peeled:
            break
    # still a pair after MAX_DEPTH levels, or more than MAX_DEPTH brackets opened and never closed (which
    # the parser would also descend into before finding the body invalid)
    return bool(_PAIR.search(brackets)) or brackets.count("[") + brackets.count("{") > MAX_DEPTH


def _no_constant(name: str) -> Any:
    raise APIError(400, f"The request body contains {name}, which is not a JSON number.")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise APIError(400, f"The number {literal[:20]} is too large.")
    return value


def parse_request(body: Any, served: str) -> ChatRequest:
    """Check a /v1/chat/completions body the way OpenAI does; every problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string naming the model.", "model")
    if model != served:
        raise APIError(404, f"The model {_show(model)} does not exist; this server serves '{served}'.",
                       "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects.", "messages")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with a role and a content.", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise APIError(400, f"messages[{i}].role is {_show(role)}; use one of system, user, assistant.",
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
    if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
        raise APIError(400, "seed must be a 64-bit integer.", "seed")
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise APIError(400, "Only n=1 is supported.", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise APIError(400, f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings of at most "
                       f"{MAX_STOP_CHARS} characters.", "stop")
    req.stop = stop
    req.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object, like {\"include_usage\": true}.", "stream_options")
    req.include_usage = _flag(options or {}, "include_usage", "stream_options.include_usage")
    return req


def _show(value: Any) -> str:
    """A value from the request, quoted and cut short, for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)  # [{"type": "text", "text": ...}, ...]
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts "
                   '({"type": "text", "text": "..."}).', f"messages[{i}].content")


def _number(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # parse_json let no NaN or infinity through, so int(value) cannot fail
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise APIError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got {_show(value)}.",
                       name)
    try:
        return kind(value)
    except OverflowError:  # an integer of hundreds of digits where a float is wanted
        raise APIError(400, f"{name} is too large.", name) from None


def _flag(body: dict, name: str, param: str = "") -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{param or name} must be true or false, got {_show(value)}.", param or name)
    return value


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object of a reply (and of the last streamed chunk when `stream_options.include_usage`)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

