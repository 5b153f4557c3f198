"""The HTTP schema of /v1/chat/completions: the request checked the way OpenAI checks it, and errors in its shape.

    request   {"model", "messages": [{"role", "content"}], "max_tokens" | "max_completion_tokens",
               "temperature", "top_p", "stop", "seed", "n": 1, "stream", "stream_options": {"include_usage"},
               "tools": [{"type": "function", "function": {"name", "description", "parameters"}}],
               "tool_choice": "none" | "auto" | "required" | {"type": "function", "function": {"name"}},
               "parallel_tool_calls", "response_format": {"type": "text" | "json_object" | "json_schema"}}
              messages may carry an assistant's "tool_calls" and the "tool" results ("tool_call_id", "content")
    error     {"error": {"message", "type", "param", "code"}} with a 4xx status (APIError)
    usage     {"prompt_tokens", "completion_tokens", "total_tokens"}
    limits    what the server accepts (`Limits`, the flags of `dlnotes serve`)

Every problem with a request is a 4xx naming the field (404 for an unknown model), never a 500 and never an
exception's own text, and the server keeps serving. The body is parsed by `parse_json`, which refuses deep
nesting before Python's recursive parser sees it, and NaN, Infinity or numbers too large for a float.
A schema (tool parameters, `json_schema`) outside what constrained decoding supports is a 400 naming the
keyword (`constrained` lists the subset); so is a tool call's `arguments` text that is not a JSON object.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from dlnotes.llm.constrained import Node, SchemaError, compile_schema

ROLES = {"system", "developer", "user", "assistant", "tool"}  # developer is OpenAI's newer name for system
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 64  # the text held back and searched each token is at most this long (a stop is a few characters)
MAX_MESSAGES = 1024  # a conversation longer than any context window: refused before the chat template loops over it
MAX_DEPTH = 32  # JSON nesting: a chat request is 4 deep ({"messages": [{"content": [{...}]}]})
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


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
    tools: list[dict[str, Any]] = field(default_factory=list)  # the "function" objects: name, description, parameters
    tool_nodes: dict[str, Node] = field(default_factory=dict)  # each tool's parameters, compiled
    tool_choice: str = "none"  # none | auto | required | function (the one named tool_name)
    tool_name: str = ""
    parallel_tool_calls: bool = True  # False: a forced reply holds one call
    grammar: Node | None = None  # what the reply must be (constrained decoding); None: free text
    tool_chars: int = 0  # characters of tools and tool calls, for the prompt's cheap length bound


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
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"'messages' has {len(messages)} entries; at most {MAX_MESSAGES} are accepted.",
                       "messages")
    chat, calls = [], set()  # calls: ids of the latest assistant tool calls, which tool messages answer
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with a role and a content.", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise APIError(400, f"messages[{i}].role is {_show(role)}; use one of system, user, assistant, tool.",
                           f"messages[{i}].role")
        entry = {"role": "system" if role == "developer" else role}
        if role == "assistant" and message.get("tool_calls") is not None:
            entry["tool_calls"] = _tool_calls(message["tool_calls"], i)
            content = message.get("content")
            entry["content"] = "" if content is None else _text_content(content, i)
            calls = {c["id"] for c in entry["tool_calls"]}
        else:
            entry["content"] = _text_content(message.get("content"), i)
            if role == "tool":
                answered = message.get("tool_call_id")
                if not isinstance(answered, str) or answered not in calls:
                    raise APIError(400, f"messages[{i}] has role 'tool' but its tool_call_id {_show(answered)} is "
                                   "not a call of the assistant message before it.", f"messages[{i}].tool_call_id")
                entry["tool_call_id"] = answered
            else:
                calls = set()
        chat.append(entry)
    req = ChatRequest(messages=chat)
    _tools(body, req)
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


def _tools(body: dict, req: ChatRequest) -> None:
    """tools, tool_choice, parallel_tool_calls and response_format into `req`, with the grammar they imply."""
    from dlnotes.llm.tools import calls_schema, forced

    tools = body.get("tools")
    shape = 'tools must be a list of {"type": "function", "function": {"name", "description", "parameters"}}.'
    if tools is not None and (not isinstance(tools, list) or not tools):
        raise APIError(400, shape, "tools")
    for k, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise APIError(400, shape, f"tools[{k}]")
        name, parameters = function.get("name"), function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise APIError(400, f"tools[{k}].function.name is {_show(name)}; a name is 1-64 letters, digits, _ or -.",
                           f"tools[{k}].function.name")
        if any(t["name"] == name for t in req.tools):
            raise APIError(400, f"tools[{k}].function.name '{name}' is given twice.", f"tools[{k}].function.name")
        description = function.get("description", "")
        if not isinstance(description, str) or not isinstance(parameters, dict):
            raise APIError(400, f"tools[{k}].function needs a string description and an object of parameters.",
                           f"tools[{k}].function")
        req.tools.append({"name": name, "description": description, "parameters": parameters})
    req.tool_chars = len(json.dumps(req.tools)) + sum(len(json.dumps(m.get("tool_calls", ""))) for m in req.messages)
    _tool_choice(body.get("tool_choice"), req)
    req.parallel_tool_calls = body.get("parallel_tool_calls") is None or _flag(body, "parallel_tool_calls")
    for k, tool in enumerate(req.tools):  # strict where the reply is constrained: every keyword must be enforced
        req.tool_nodes[tool["name"]] = _compile(tool["parameters"], f"tools[{k}].function.parameters",
                                                strict=forced(req))
    if forced(req):
        req.grammar = _compile(calls_schema(req), "tools")
    fmt = _response_format(body.get("response_format"))
    if fmt is not None and req.grammar is None and req.tool_choice == "none":  # with "auto" the reply may be a call
        req.grammar = fmt


def _tool_choice(choice: Any, req: ChatRequest) -> None:
    names = [t["name"] for t in req.tools]
    if choice is None or choice in ("none", "auto"):
        req.tool_choice = "none" if not req.tools else choice or "auto"
        return
    if not req.tools:
        raise APIError(400, "tool_choice needs tools: give the functions the model may call.", "tool_choice")
    if choice == "required":
        req.tool_choice = "required"
        return
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                       '{"name": ...}}.', "tool_choice")
    if name not in names:
        raise APIError(400, f"tool_choice names the function {_show(name)}, which is not among the tools "
                       f"({', '.join(names)}).", "tool_choice")
    req.tool_choice, req.tool_name = "function", name


def _response_format(fmt: Any) -> Node | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return _compile({"type": "object"}, "response_format")
    spec = fmt.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise APIError(400, 'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                       '"json_schema", "json_schema": {"name": ..., "schema": {...}}}.', "response_format")
    node = _compile(spec["schema"], "response_format.json_schema.schema")
    if node.kind != "object":
        raise APIError(400, "The root of response_format's schema must be an object ({\"type\": \"object\", ...}).",
                       "response_format.json_schema.schema")
    return node


def _compile(schema: Any, where: str, strict: bool = True) -> Node:
    try:
        return compile_schema(schema, where, strict)
    except SchemaError as err:
        raise APIError(400, f"{err}.", err.where.split(".properties")[0], "unsupported_schema") from None
    except RecursionError:
        raise APIError(400, f"{where} nests too deeply.", where) from None


def _tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool_calls, checked; each call's arguments must be the text of a JSON object."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or not calls:
        raise APIError(400, f'{where} must be a non-empty list of {{"id", "type": "function", "function": {{"name", '
                       '"arguments"}}}}.', where)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(call.get("id"), str)
                or call.get("type", "function") != "function" or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments"), str)):
            raise APIError(400, f'{where}[{j}] must be {{"id": "...", "type": "function", "function": {{"name": '
                           '"...", "arguments": "{...}"}}}} with arguments as a JSON string.', f"{where}[{j}]")
        text = function["arguments"]
        try:
            if _too_deep(text):
                raise ValueError("nested too deeply")
            arguments = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
        except (ValueError, RecursionError, APIError) as err:
            why = err.message if isinstance(err, APIError) else str(err).split(":")[0]
            raise APIError(400, f"{where}[{j}].function.arguments is not JSON ({why}): {_show(text)}.",
                           f"{where}[{j}].function.arguments") from None
        if not isinstance(arguments, dict):
            raise APIError(400, f"{where}[{j}].function.arguments must be a JSON object, got {_show(text)}.",
                           f"{where}[{j}].function.arguments")
        out.append({"id": call["id"], "type": "function",
                    "function": {"name": function["name"], "arguments": text}})
    return out


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

