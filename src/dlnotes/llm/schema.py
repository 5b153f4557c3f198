"""The HTTP schema of /v1/chat/completions: the request checked the way OpenAI checks it, and errors in its shape.

    request   {"model", "messages": [{"role", "content"}], "max_tokens" | "max_completion_tokens",
               "temperature", "top_p", "stop", "seed", "n": 1, "stream", "stream_options": {"include_usage"}}
    error     {"error": {"message", "type", "param", "code"}} with a 4xx status (APIError)
    usage     {"prompt_tokens", "completion_tokens", "total_tokens"}

Every problem with a request is a 400 (404 for an unknown model) naming the field, and the server keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = {"system", "developer", "user", "assistant"}  # developer is OpenAI's newer name for system


class APIError(Exception):
    """Becomes `{"error": {...}}` with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

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



def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object of a reply (and of the last streamed chunk when `stream_options.include_usage`)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

