"""Tool calls: OpenAI's `tools` into the prompt, the model's reply back into OpenAI's `tool_calls`.

A chat model calls a tool by writing text in a format it was trained on; the server's job is to describe
the tools in that format and to recognize a call in the reply. Two ways in:

    the chat template knows tools      (Qwen2.5, Hermes, Llama 3.1, ...: its source mentions `tools`)
        apply_chat_template(messages, tools=[...]): the model's own words for them; calls are expected as
        <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (the Hermes/Qwen convention)
    it does not                        (SmolLM2-135M-Instruct's template has only role and content)
        the tools go into the system message with the prompt SmolLM2's fine-tuning data used for function
        calling (APIGen), asking for <tool_call>[{"name": ..., "arguments": {...}}]</tool_call>

Either way the way back is the same: assistant messages with `tool_calls` become that call text again, and
`tool` messages (the results) are shown to the model as <tool_response> blocks (a user turn when the
template has no tool role).

    text = chat_prompt(tokenizer, req)         # the templated prompt, ending where the reply begins
    content, calls = parse_reply(text, req)     # calls in OpenAI's shape, or none and the text as content

With `tool_choice` "required" or a named function the reply is constrained (`guide`): the prompt ends
with `<tool_call>` already written, and the model may only write a JSON list of calls that match the tools'
parameter schemas (`calls_schema`), so what comes back always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import TYPE_CHECKING, Any

from dlnotes.llm.constrained import validate

if TYPE_CHECKING:
    from dlnotes.llm.schema import ChatRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

# The system prompt of SmolLM2's function-calling training data (its model card), for templates without tools.
TOOLS_PROMPT = """You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you will need to make one or more function/tool calls to achieve the purpose.
If none of the functions can be used, point it out and refuse to answer.
If the given question lacks the parameters required by the function, also point it out.

You have access to the following tools:
<tools>{tools}</tools>

The output MUST strictly adhere to the following format, and NO other text MUST be included.
The example format is as follows. Please make sure the parameter type is correct. If no function call is needed,
please make the tool calls an empty list '[]'.
<tool_call>[
{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},
... (more tool calls as required)
]</tool_call>"""


def offered(req: ChatRequest) -> list[dict[str, Any]]:
    """The tools the prompt describes: none for tool_choice "none", only the named one when one is named."""
    if req.tool_choice == "none":
        return []
    return [t for t in req.tools if req.tool_choice != "function" or t["name"] == req.tool_name]


def forced(req: ChatRequest) -> bool:
    """The reply must be tool calls: it is constrained, and the prompt ends with the opening tag."""
    return bool(req.tools) and req.tool_choice in ("required", "function")


def calls_schema(req: ChatRequest) -> dict[str, Any]:
    """The JSON schema of a forced reply: a list of {"name": one of the tools, "arguments": its parameters}."""
    options = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                "required": ["name", "arguments"]} for t in offered(req)]
    single = req.tool_choice == "function" or not req.parallel_tool_calls
    return {"type": "array", "items": options[0] if len(options) == 1 else {"anyOf": options}, "minItems": 1,
            **({"maxItems": 1} if single else {})}


def native(tokenizer: Any) -> bool:
    """Whether the model's chat template renders tools itself."""
    template = tokenizer.chat_template
    return isinstance(template, str) and "tools" in template


def chat_prompt(tokenizer: Any, req: ChatRequest) -> str:
    """The prompt text: the chat template applied to the messages (and tools), ending where the reply begins."""
    tools = offered(req)
    if req.tools and native(tokenizer):
        messages = [_hf_message(m) for m in req.messages]
        text = tokenizer.apply_chat_template(messages, tools=[{"type": "function", "function": t} for t in tools]
                                             or None, add_generation_prompt=True, tokenize=False)
    else:
        text = tokenizer.apply_chat_template(_plain_messages(req.messages, tools), add_generation_prompt=True,
                                             tokenize=False)
    return text + OPEN if forced(req) else text


def _hf_message(message: dict) -> dict:
    """OpenAI's message -> what tool-aware templates read (arguments as an object, not a JSON string)."""
    out = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "id": c["id"], "function": {
            "name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in message["tool_calls"]]
    if message["role"] == "tool":
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _plain_messages(messages: list[dict], tools: list[dict]) -> list[dict[str, str]]:
    """Messages of role and content only: the tools in the system message, calls and results as text."""
    out: list[dict[str, str]] = []
    if tools:
        block = TOOLS_PROMPT.format(tools=json.dumps(tools, ensure_ascii=False))
        if messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}".strip()})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for message in messages:
        role, content = message["role"], message["content"]
        if message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                     for c in message["tool_calls"]]
            content = f"{content}\n" * bool(content) + f"{OPEN}{json.dumps(calls, ensure_ascii=False)}{CLOSE}"
        if role == "tool":  # results of one round of calls share one user turn
            content = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("tool"):
                out[-1]["content"] += "\n" + content
                continue
            out.append({"role": "user", "content": content, "tool": "yes"})
            continue
        out.append({"role": role, "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def parse_reply(text: str, req: ChatRequest) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a reply. Calls are returned only when every one parses, names an offered tool
    and has arguments that match its parameters; otherwise there are none and the whole text is the content
    (the client sees what the model wrote)."""
    if forced(req):
        bodies, before = [text], ""  # the prompt ended with the opening tag: the reply is the JSON
    elif not offered(req) or OPEN not in text:
        return text, []
    else:
        before, bodies = text[:text.index(OPEN)].strip(), _BLOCK.findall(text)
    calls = []
    for body in bodies:
        try:
            value = json.loads(body)
        except ValueError:
            return text, []
        for item in value if isinstance(value, list) else [value]:
            call = _call(item, req)
            if call is None:
                return text, []
            calls.append(call)
    if not calls:
        return before, []  # `<tool_call>[]</tool_call>`: the model decided that no tool applies
    return before or None, calls


def _call(item: Any, req: ChatRequest) -> dict[str, Any] | None:
    """One {"name", "arguments"} item as an OpenAI tool call, or None if it is not a valid call."""
    if not isinstance(item, dict) or set(item) - {"name", "arguments"} or not isinstance(item.get("name"), str):
        return None
    tool = next((t for t in offered(req) if t["name"] == item["name"]), None)
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if tool is None or not isinstance(arguments, dict) or not validate(req.tool_nodes[tool["name"]], arguments):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": tool["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}
