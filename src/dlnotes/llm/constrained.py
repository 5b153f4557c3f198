"""Constrained decoding: the model may only pick tokens that keep its reply on the way to JSON of a schema.

What llama.cpp's grammars, vLLM's guided decoding and Ollama's `format` do, small: `response_format`
(`json_object`, `json_schema`) and forced tool calls (`tool_choice` "required" or a named function) turn
into a `Node` tree; a `Guide` follows the reply byte by byte with a pushdown matcher and, at each step,
lets through only tokens whose bytes the matcher accepts (`guide`). This module is the matcher:

    node = compile_schema({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    state = feed(start_state(node), b'{"city": "Par')   # () once the bytes cannot lead to a valid value
    min_len(state), finished(state)                     # 2 ('"}' finishes it), False
    validate(node, {"city": "Paris"})                   # a parsed value against the schema (key order free)

The subset of JSON Schema (OpenAI's structured outputs accept about the same; anything else is refused,
naming the keyword, rather than silently not enforced):

    type         object, array, string, number, integer, boolean, null, or a list of them
    object       properties (written in the order they are declared, as llama.cpp's grammars also do),
                 required, additionalProperties: false; an object with no properties takes any keys
    array        items, minItems, maxItems
    enum, const  any JSON values (written compactly, as json.dumps(separators=(",", ":")))
    anyOf        alternatives, followed side by side until the bytes tell them apart
    annotations  title, description, default, examples, $schema, $id, $comment: ignored

Not supported: $ref/$defs (recursion), pattern, format, minLength/maxLength, minimum/maximum, multipleOf,
oneOf/allOf/not, if/then/else, patternProperties, uniqueItems, prefixItems. Whitespace between tokens is
allowed up to WS_MAX bytes at a time (so a model cannot pad forever); strings are any JSON string.

`min_len` is exact (the test walks it), which is what lets `guide` promise a complete value within
max_tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

WS = frozenset(b" \t\n\r")
WS_MAX = 12  # whitespace bytes in a row between two JSON tokens: a newline and indentation, not a padded page
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly"}
SUPPORTED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
             "const", "anyOf"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class SchemaError(ValueError):
    """A schema outside the supported subset, or malformed; `where` is its path, like `schema.properties.x`."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


# --- the schema, compiled to nodes -------------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """One schema: what value may come here. `kind` is any, object, array, string, number, literal or anyof."""
    kind: str
    props: tuple[tuple[bytes, str, Node, bool], ...] = ()  # object: (key as JSON, key, schema, required)
    free: bool = False  # object: any keys, any values (json_object, or "type": "object" with no properties)
    items: Node | None = None  # array
    min_items: int = 0
    max_items: int | None = None
    integer: bool = False  # number: no fraction, no exponent
    literals: tuple[bytes, ...] = ()  # literal: the JSON texts allowed (enum, const, true/false, null)
    options: tuple[Node, ...] = ()  # anyof
    min_size: int = 0  # bytes of the shortest value of this schema (set by _finish)
    first_required: tuple[int, ...] = field(default=(), repr=False)  # object: first required prop at or after i


ANY = Node("any", min_size=1)  # the shortest JSON value: a digit


def compile_schema(schema: Any, where: str = "schema", strict: bool = True) -> Node:
    """A JSON schema -> a Node. strict: keywords outside the subset are a SchemaError; otherwise they are
    ignored (the value is then checked more loosely than the schema says: fine for validating, not for a
    promise to the client)."""
    if schema is True or schema == {}:
        return ANY
    if not isinstance(schema, dict):
        raise SchemaError(where, "a schema must be a JSON object")
    unknown = sorted(set(schema) - SUPPORTED - ANNOTATIONS)
    if unknown and strict:
        raise SchemaError(where, f"'{unknown[0]}' is outside the supported subset of JSON Schema (type, properties, "
                          "required, additionalProperties: false, items, minItems, maxItems, enum, const, anyOf)")
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{where}.enum", "must be a non-empty list")
        texts = {json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode() for v in values}
        return _finish(Node("literal", literals=tuple(sorted(texts))))
    if "anyOf" in schema:
        options = schema["anyOf"]
        if not isinstance(options, list) or not options:
            raise SchemaError(f"{where}.anyOf", "must be a non-empty list of schemas")
        rest = {k: v for k, v in schema.items() if k != "anyOf" and k not in ANNOTATIONS}
        if rest and strict:
            raise SchemaError(where, "anyOf cannot be combined with other keywords here; put them in each option")
        return _finish(Node("anyof", options=tuple(compile_schema(o, f"{where}.anyOf[{i}]", strict)
                                                   for i, o in enumerate(options))))
    kind = schema.get("type")
    if kind is None:  # the type implied by the keywords present
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if kind is None:
            return ANY
    if isinstance(kind, list):
        if not kind:
            raise SchemaError(f"{where}.type", "must name at least one type")
        return _finish(Node("anyof", options=tuple(compile_schema(schema | {"type": k}, where, strict) for k in kind)))
    if kind not in TYPES:
        raise SchemaError(f"{where}.type", f"{str(kind)[:40]!r} is not a JSON Schema type ({', '.join(TYPES)})")
    if kind == "object":
        return _object(schema, where, strict)
    if kind == "array":
        return _array(schema, where, strict)
    if kind in ("number", "integer"):
        return _finish(Node("number", integer=kind == "integer"))
    if kind == "boolean":
        return _finish(Node("literal", literals=(b"false", b"true")))
    if kind == "null":
        return _finish(Node("literal", literals=(b"null",)))
    return _finish(Node("string"))


def _object(schema: dict, where: str, strict: bool) -> Node:
    props = schema.get("properties", {})
    required = schema.get("required", [])
    extra = schema.get("additionalProperties", None)
    if not isinstance(props, dict):
        raise SchemaError(f"{where}.properties", "must be an object of schemas")
    if not isinstance(required, list) or not all(isinstance(r, str) and r in props for r in required):
        raise SchemaError(f"{where}.required", "must be a list of names among the properties")
    if extra not in (None, False, True) or (extra is True and props and strict):
        raise SchemaError(f"{where}.additionalProperties", "only false is supported next to properties")
    if not props and extra is not False:
        return _finish(Node("object", free=True))
    compiled = tuple((json.dumps(k, ensure_ascii=False).encode(), k,
                      compile_schema(v, f"{where}.properties.{k}", strict), k in required) for k, v in props.items())
    return _finish(Node("object", props=compiled))


def _array(schema: dict, where: str, strict: bool) -> Node:
    low, high = schema.get("minItems", 0), schema.get("maxItems")
    for name, value in (("minItems", low), ("maxItems", high)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000):
            raise SchemaError(f"{where}.{name}", "must be an integer from 0 to 1000")
    if high is not None and high < low:
        raise SchemaError(f"{where}.maxItems", "is less than minItems")
    items = compile_schema(schema.get("items", True), f"{where}.items", strict)
    return _finish(Node("array", items=items, min_items=low, max_items=high))


def _finish(node: Node) -> Node:
    """Set the sizes the matcher needs to know how short a completion can be."""
    if node.kind == "object":
        n = len(node.props)
        first = [n] * (n + 1)
        for i in range(n - 1, -1, -1):
            first[i] = i if node.props[i][3] else first[i + 1]
        node.first_required = tuple(first)
        node.min_size = 1 + _after(node, 0) - (1 if first[0] < n else 0)  # '{' + props + '}', no leading comma
    elif node.kind == "array":
        node.min_size = 2 + node.min_items * (node.items.min_size + 1) - (1 if node.min_items else 0)
    elif node.kind == "string":
        node.min_size = 2
    elif node.kind == "number":
        node.min_size = 1
    elif node.kind == "literal":
        node.min_size = min(map(len, node.literals))
    elif node.kind == "anyof":
        node.min_size = min(o.min_size for o in node.options)
    return node


def _after(node: Node, index: int) -> int:
    """Bytes to close an object after a value, with properties from `index` on to write: `,"k":v` for each
    required one, then '}'."""
    return 1 + sum(1 + len(key) + 1 + schema.min_size for key, _, schema, req in node.props[index:] if req)


def literal_bytes(node: Node) -> set[int]:
    """Every byte of the schema's keys and literal values (what a completion may have to spell)."""
    found = set()
    for key, _, child, _ in node.props:
        found |= set(key) | literal_bytes(child)
    for text in node.literals:
        found |= set(text)
    for child in (*node.options, *([node.items] if node.items else [])):
        found |= literal_bytes(child)
    return found


def validate(node: Node, value: Any) -> bool:
    """Whether a parsed JSON value matches the schema (key order free: this checks, it does not generate)."""
    kind = node.kind
    if kind == "any":
        return True
    if kind == "anyof":
        return any(validate(o, value) for o in node.options)
    if kind == "literal":
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() in node.literals
    if kind == "string":
        return isinstance(value, str)
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return not node.integer or float(value).is_integer()
    if kind == "array":
        return (isinstance(value, list) and len(value) >= node.min_items
                and (node.max_items is None or len(value) <= node.max_items)
                and all(validate(node.items, v) for v in value))
    if not isinstance(value, dict):
        return False
    if node.free:
        return True
    known = {name: (schema, req) for _, name, schema, req in node.props}
    return (set(value) <= set(known) and all(name in value for name, (_, req) in known.items() if req)
            and all(validate(known[k][0], v) for k, v in value.items()))


# --- the matcher: a pushdown automaton over bytes ------------------------------------------------------------------
#
# A state is a tuple of alternatives (anyOf and literals that share a prefix keep several alive); an alternative
# is a stack, a tuple of frames, the innermost last. The empty stack is a finished value. Frames:
#   ("v", node, ws)                  a value of `node` is expected; `ws` whitespace bytes seen before it
#   ("o", node, phase, index, ws)    inside an object. phase: first (after '{'), key (after ','), colon (after a
#                                    key), value (a value is being written), after (after a value); `index`: the
#                                    next property that may be written (properties come in declared order)
#   ("a", node, phase, count, ws)    inside an array: first, value, after; `count` values so far
#   ("s", escape)                    inside a string: 0, or 1 after a backslash, 2-5 inside \uXXXX
#   ("l", texts, pos, results)       inside literal texts (enum values, keys), `pos` bytes matched
#   ("n", integer, phase)            inside a number: sign, zero, int, frac0, frac, exp0, expsign, exp

Stack = tuple
State = tuple

_NUMBER = {  # phase -> {byte class: next phase}; a complete number ends at any other byte
    "sign": {"0": "zero", "d": "int"}, "zero": {".": "frac0", "e": "exp0"},
    "int": {"0": "int", "d": "int", ".": "frac0", "e": "exp0"}, "frac0": {"0": "frac", "d": "frac"},
    "frac": {"0": "frac", "d": "frac", "e": "exp0"}, "exp0": {"+": "expsign", "0": "exp", "d": "exp"},
    "expsign": {"0": "exp", "d": "exp"}, "exp": {"0": "exp", "d": "exp"},
}
_COMPLETE = {"zero", "int", "frac", "exp"}
_NUMBER_CLASS = {ord("0"): "0", **{ord(c): "d" for c in "123456789"}, ord("."): ".", ord("e"): "e", ord("E"): "e",
                 ord("+"): "+", ord("-"): "+"}
_ESCAPES = frozenset(b'"\\/bfnrtu')
_HEX = frozenset(b"0123456789abcdefABCDEF")


def start_state(node: Node) -> State:
    return ((("v", node, 0),),)


def feed(state: State, data: bytes) -> State:
    """The state after `data`, or () when no alternative accepts it."""
    for byte in data:
        state = tuple(dict.fromkeys(s for stack in state for s in _step(stack, byte)))  # dedupe, keep order
        if not state:
            return ()
    return state


def finished(state: State) -> bool:
    return any(not stack for stack in state)


def _step(stack: Stack, b: int) -> list[Stack]:
    if not stack:
        return []  # nothing may follow a finished value
    frame = stack[-1]
    kind = frame[0]
    if kind == "v":
        if b in WS:
            return [stack[:-1] + (("v", frame[1], frame[2] + 1),)] if frame[2] < WS_MAX else []
        return _start(stack[:-1], frame[1], b)
    if kind == "s":
        escape = frame[1]
        if escape == 0:
            if b == 0x22:  # '"'
                return [_done(stack[:-1])]
            if b == 0x5C:  # '\'
                return [stack[:-1] + (("s", 1),)]
            return [stack] if b >= 0x20 else []  # control characters must be escaped
        if escape == 1:
            return [stack[:-1] + (("s", 2 if b == 0x75 else 0),)] if b in _ESCAPES else []
        return [stack[:-1] + (("s", escape + 1 if escape < 5 else 0),)] if b in _HEX else []
    if kind == "l":
        _, texts, pos, results = frame
        out, longer, longer_results = [], [], []
        for text, result in zip(texts, results):
            if pos < len(text) and text[pos] == b:
                if pos + 1 == len(text):
                    out.append(_done(stack[:-1], result))
                else:
                    longer.append(text)
                    longer_results.append(result)
        if longer:
            out.append(stack[:-1] + (("l", tuple(longer), pos + 1, tuple(longer_results)),))
        return out
    if kind == "n":
        _, integer, phase = frame
        cls = _NUMBER_CLASS.get(b)
        nxt = _NUMBER[phase].get(cls) if not (integer and cls in (".", "e")) else None
        if nxt is not None:
            return [stack[:-1] + (("n", integer, nxt),)]
        return _step(_done(stack[:-1]), b) if phase in _COMPLETE else []  # the byte after the number
    if kind == "o":
        return _object_step(stack, frame, b)
    return _array_step(stack, frame, b)


def _start(base: Stack, node: Node, b: int) -> list[Stack]:
    """A value of `node` whose first byte is `b` (not whitespace)."""
    kind = node.kind
    if kind == "anyof":
        return [s for option in node.options for s in _start(base, option, b)]
    if kind == "literal":
        return _step(base + (("l", node.literals, 0, (None,) * len(node.literals)),), b)
    if kind == "any":
        if b == 0x7B:
            return [base + (("o", _FREE_OBJECT, "first", 0, 0),)]
        if b == 0x5B:
            return [base + (("a", _ANY_ARRAY, "first", 0, 0),)]
        return _start(base, _ANY_SCALAR, b)
    if kind == "object":
        return [base + (("o", node, "first", 0, 0),)] if b == 0x7B else []
    if kind == "array":
        return [base + (("a", node, "first", 0, 0),)] if b == 0x5B else []
    if kind == "string":
        return [base + (("s", 0),)] if b == 0x22 else []
    if b == 0x2D:  # '-'
        return [base + (("n", node.integer, "sign"),)]
    cls = _NUMBER_CLASS.get(b)
    return [base + (("n", node.integer, "zero" if cls == "0" else "int"),)] if cls in ("0", "d") else []


def _done(base: Stack, result: Any = None) -> Stack:
    """The innermost value (or an object's key) is complete: its container moves on."""
    if not base:
        return base
    frame = base[-1]
    if frame[0] == "o":
        _, node, phase, index, _ = frame
        if phase in ("first", "key"):  # that was a key; `result` is its property's position
            return base[:-1] + (("o", node, "colon", index if node.free else result + 1, 0),)
        return base[:-1] + (("o", node, "after", index, 0),)
    _, node, _, count, _ = frame
    return base[:-1] + (("a", node, "after", count, 0),)


def _object_step(stack: Stack, frame: tuple, b: int) -> list[Stack]:
    _, node, phase, index, ws = frame
    base = stack[:-1]
    if b in WS:
        return [base + (("o", node, phase, index, ws + 1),)] if ws < WS_MAX else []
    if phase in ("first", "key"):
        if b == 0x22:  # a key
            if node.free:
                return [stack + (("s", 0),)]
            last = min(node.first_required[index], len(node.props) - 1)  # skip optional ones, not a required one
            keys = [(node.props[j][0], j) for j in range(index, last + 1)]
            if not keys:
                return []
            return [stack + (("l", tuple(k for k, _ in keys), 1, tuple(j for _, j in keys)),)]
        if b == 0x7D and phase == "first" and _may_close(node, index):
            return [_done(base)]
        return []
    if phase == "colon":
        if b != 0x3A:
            return []
        value = ANY if node.free else node.props[index - 1][2]
        return [base + (("o", node, "value", index, 0), ("v", value, 0))]
    # after a value
    if b == 0x2C and (node.free or index < len(node.props)):
        return [base + (("o", node, "key", index, 0),)]
    if b == 0x7D and _may_close(node, index):
        return [_done(base)]
    return []


def _may_close(node: Node, index: int) -> bool:
    return node.free or node.first_required[index] == len(node.props)


def _array_step(stack: Stack, frame: tuple, b: int) -> list[Stack]:
    _, node, phase, count, ws = frame
    base = stack[:-1]
    if b in WS:
        return [base + (("a", node, phase, count, ws + 1),)] if ws < WS_MAX else []
    full = node.max_items is not None and count >= node.max_items
    if b == 0x5D:  # ']'
        return [_done(base)] if count >= node.min_items else []
    if phase == "first":
        return [] if full else _start(base + (("a", node, "value", 1, 0),), node.items, b)
    if b == 0x2C and not full:
        return [base + (("a", node, "value", count + 1, 0), ("v", node.items, 0))]
    return []


_FREE_OBJECT = Node("object", free=True, min_size=2)
_ANY_ARRAY = Node("array", items=ANY, min_size=2)
_ANY_SCALAR = Node("anyof", options=(Node("string", min_size=2), Node("number", min_size=1),
                                     Node("literal", literals=(b"false", b"null", b"true"), min_size=4)), min_size=1)


def min_len(state: State) -> int:
    """Bytes of the shortest text that finishes the value, over the alternatives (0 when finished)."""
    return min(_stack_len(stack) for stack in state)


def _stack_len(stack: Stack) -> int:
    frames = stack[::-1]  # innermost first
    if not frames:
        return 0
    if len(frames) > 1 and frames[1][0] == "o" and frames[1][2] in ("first", "key"):  # a key is being written
        node = frames[1][1]
        if node.free:
            total = _frame_len(frames[0]) + 3  # the key's closing quote, then ':0}'
        else:
            _, texts, pos, results = frames[0]
            total = min(len(text) - pos + 1 + node.props[j][2].min_size + _after(node, j + 1)
                        for text, j in zip(texts, results))
        below = frames[2:]
    else:
        total, below = _frame_len(frames[0]), frames[1:]
    for frame in below:  # containers whose current value is being written
        node, count = frame[1], frame[3]
        if frame[0] == "o":
            total += 1 if node.free else _after(node, count)
        else:
            total += 1 + max(0, node.min_items - count) * (1 + node.items.min_size)
    return total


def _frame_len(frame: tuple) -> int:
    kind = frame[0]
    if kind == "v":
        return frame[1].min_size
    if kind == "s":
        return 1 if frame[1] == 0 else 2 if frame[1] == 1 else 7 - frame[1]  # '"', 'n"', the rest of \uXXXX + '"'
    if kind == "l":
        return min(len(t) for t in frame[1]) - frame[2]
    if kind == "n":
        return 0 if frame[2] in _COMPLETE else 1
    if kind == "a":
        _, node, phase, count, _ = frame
        if phase == "first" and node.min_items == 0:
            return 1
        return max(0, node.min_items - count) * (1 + node.items.min_size) + 1 - (1 if phase == "first" else 0)
    _, node, phase, index, _ = frame
    if node.free:
        return {"first": 1, "key": 5, "colon": 3, "after": 1}[phase]  # '}', '"":0}', ':0}', '}'
    if phase == "colon":
        return 1 + node.props[index - 1][2].min_size + _after(node, index)
    if phase == "after":
        return _after(node, index)
    if node.first_required[index] < len(node.props):  # first or key: the required properties, no leading comma
        return _after(node, index) - 1
    if phase == "first":
        return 1
    return 1 + min(len(k) + 1 + s.min_size for k, _, s, _ in node.props[index:])  # after a comma: one property
