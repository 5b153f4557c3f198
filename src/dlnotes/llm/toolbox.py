"""The local tools that `llm-chat --tools` offers a model: a calculator and two lookups in this cookbook's catalog.

    specs(["calculator"])                       the OpenAI `tools` list for those names
    run_tool("calculator", '{"expression": "2*(3+4)"}')  -> "14"

A tool's answer is always text for the model to read; a mistake of the model (an unknown tool, arguments
that are not JSON or miss a field, an expression the calculator refuses) is an answer that starts with
"error:", so the model can see it and try again, as OpenAI's guide suggests. Nothing here imports torch.

The calculator parses the expression with `ast` and walks the tree itself: numbers, + - * / // % **,
parentheses and a few functions. No eval, no names beyond those, and bounds on exponents and sizes, so a
model (or whoever writes its prompt) cannot run code or make it compute for an hour.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Callable
from typing import Any

from dlnotes import catalog

MAX_EXPRESSION = 200  # characters: an arithmetic question, not a program
MAX_EXPONENT = 1000  # 2 ** 1000 is fine; 9 ** 9 ** 9 (370 million digits) is refused
MAX_DIGITS = 400  # an integer result longer than this is refused rather than computed further

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos,
    "tan": math.tan, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}


class ToolError(Exception):
    """What the model did wrong, in words it can act on."""


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression ("2 * (3 + 4)", "sqrt(144) / 3", "2 ** 10", "17 × 23")."""
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**").strip()
    if not text:
        raise ToolError("the expression is empty")
    if len(text) > MAX_EXPRESSION:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"{expression!r} is not an arithmetic expression") from None
    try:
        return _value(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (OverflowError, ValueError) as err:
        raise ToolError(f"cannot compute {expression!r}: {err}") from None


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"the exponent {right} is larger than {MAX_EXPONENT}")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex):
            raise ToolError("the result is not a real number")
        if isinstance(result, int) and result.bit_length() > MAX_DIGITS * 3.33:
            raise ToolError(f"the result has more than {MAX_DIGITS} digits")
        return result
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords and len(node.args) in (1, 2)):
        return _FUNCTIONS[node.func.id](*(_value(a) for a in node.args))
    raise ToolError(f"{ast.unparse(node)[:40]!r} is not allowed: use numbers, + - * / // % **, parentheses, "
                    f"pi, e and {', '.join(_FUNCTIONS)}")


def calculator(expression: str) -> str:
    value = calculate(expression)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(round(value, 10) if isinstance(value, float) else value)


def recipe_info(recipe: str) -> str:
    """What the catalog says about one recipe: title, tags, data, target, flags."""
    try:
        info = catalog.get(recipe)
    except Exception as err:  # UserError: unknown recipe, with a suggestion
        raise ToolError(str(err)) from None
    flags = ", ".join(f.flag for f in info.fields)
    return (f"{info.id}: {info.title}\ntags: {', '.join(info.tags)}\ndata: {info.dataset or 'none'}\n"
            f"target: {info.target or 'none'}\nflags: {flags}\nrun: dlnotes run {info.id}")


def find_recipes(tag: str) -> str:
    """The recipes with this tag (or with the word in their title), one per line."""
    word = tag.strip().lower()
    found = [f"{r.id}: {r.title}" for r in catalog.all_recipes().values()
             if word in r.tags or (word and word in r.title.lower())]
    return "\n".join(found) if found else f"no recipe has the tag {tag!r}; tags: {', '.join(all_tags())}"


def all_tags() -> list[str]:
    return sorted({t for r in catalog.all_recipes().values() for t in r.tags})


def _specs() -> dict[str, tuple[Callable[..., str], dict[str, Any]]]:
    """Each tool: its function and its OpenAI description. The lookups list the catalog's ids and tags as an
    enum, so a constrained call can only name one that exists."""
    ids = sorted(catalog.all_recipes())
    return {
        "calculator": (calculator, {
            "name": "calculator", "description": "Evaluate an arithmetic expression and return its value.",
            "parameters": {"type": "object", "properties": {"expression": {
                "type": "string", "description": "numbers, + - * / ** and parentheses, e.g. (3 + 4) * 12"}},
                "required": ["expression"]}}),
        "recipe_info": (recipe_info, {
            "name": "recipe_info",
            "description": "Look up one recipe of the dlnotes cookbook: what it trains, its data, target and flags.",
            "parameters": {"type": "object", "properties": {"recipe": {
                "type": "string", "enum": ids, "description": "the recipe id, e.g. cnn-mnist"}},
                "required": ["recipe"]}}),
        "find_recipes": (find_recipes, {
            "name": "find_recipes", "description": "List the cookbook's recipes about a topic (a tag).",
            "parameters": {"type": "object", "properties": {"tag": {
                "type": "string", "enum": all_tags(), "description": "a topic, e.g. vision or translation"}},
                "required": ["tag"]}}),
    }


NAMES = ("calculator", "recipe_info", "find_recipes")


def specs(names: list[str]) -> list[dict[str, Any]]:
    """The OpenAI `tools` list for these tool names."""
    table = _specs()
    return [{"type": "function", "function": table[name][1]} for name in names]


def run_tool(name: str, arguments: str) -> str:
    """Run one call the model made; its answer, or "error: ..." for the model to read."""
    table = _specs()
    if name not in table:
        return f"error: there is no tool {name!r}; the tools are {', '.join(NAMES)}"
    function, spec = table[name]
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        return f"error: the arguments are not JSON: {arguments[:80]!r}"
    wanted = spec["parameters"]["properties"]
    if not isinstance(args, dict) or set(args) != set(wanted) or not all(isinstance(v, str) for v in args.values()):
        return f"error: {name} takes {json.dumps({k: 'text' for k in wanted})}, got {arguments[:80]}"
    try:
        return function(**args)
    except ToolError as err:
        return f"error: {err}"
