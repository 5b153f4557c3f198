"""Tool calls and structured output: the JSON matcher, constrained decoding on the tiny random model, tool calls
round-tripping through the real `openai` client, the local tools of `llm-chat --tools`, and the bad inputs.

The tiny model writes random tokens, so whatever is valid about its constrained replies is the matcher's doing:
a reply that did not parse or match its schema would show a hole in the constraint.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest
from conftest import assert_one_line_error

from dlnotes.llm import toolbox
from dlnotes.llm.constrained import SchemaError, compile_schema, feed, finished, min_len, start_state, validate
from dlnotes.llm.decoders import LlamaDecoder
from dlnotes.llm.engine import Engine
from dlnotes.llm.schema import parse_request
from dlnotes.llm.server import BackgroundServer
from dlnotes.llm.tiny import CHATML, tiny_model
from dlnotes.llm.tools import chat_prompt, parse_reply

KEY = "tools-key"
CALC = {"type": "function", "function": {"name": "calculator", "description": "arithmetic", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
INFO = {"type": "function", "function": {"name": "recipe_info", "parameters": {
    "type": "object", "properties": {"recipe": {"enum": ["mlp", "cnn-mnist"]}, "verbose": {"type": "boolean"}},
    "required": ["recipe"]}}}
ASK = [{"role": "user", "content": "What is 2 + 2?"}]
SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "height": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "pet": {"type": ["string", "null"]}, "mood": {"enum": ["happy", "sad", 3, None]}},
        "required": ["name", "age", "tags"]},
    "nested": {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "array", "minItems": 2, "items": {
            "type": "object", "properties": {"c": {"type": "boolean"}}, "required": ["c"]}}}, "required": ["b"]},
        "n": {"const": 7}}, "required": ["a"]},
    "any object": {"type": "object"},
    "calls": {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": "calculator"}, "arguments": {
            "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}},
         "required": ["name", "arguments"]},
        {"type": "object", "properties": {"name": {"const": "recipe_info"}, "arguments": {
            "type": "object", "properties": {"recipe": {"enum": ["mlp", "cnn-mnist"]}}, "required": ["recipe"]}},
         "required": ["name", "arguments"]}]}},
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    """The tiny model with room for the tools' description (~1,000 of its tokens), decoding eagerly: compiling
    the step (tested in test_serve) would cost more time here than all these tests decode."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dlnotes.llm.engine.decoder_for", lambda model: LlamaDecoder(model, compile=False))
        return Engine(tiny_model(context=4096))


@pytest.fixture(scope="module")
def url(engine: Engine):
    with BackgroundServer(engine, api_key=KEY) as base_url:
        yield base_url


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)


def generate(engine: Engine, body: dict) -> tuple[str, str]:
    """(text, finish_reason) of a request decoded by the engine, in-process."""
    req = parse_request({"model": engine.name, "messages": ASK} | body, engine.name)
    ids, budget = engine.check_budget(req)
    pieces = list(engine.generate(req, ids, budget, threading.Event()))
    return "".join(p.text for p in pieces), pieces[-1].finish_reason


# --- the matcher -----------------------------------------------------------------------------------------------


def shortest_completion(state) -> int:
    """Follow, byte by byte, a byte that brings min_len down by one, until the value is finished."""
    steps = 0
    while not finished(state):
        need = min_len(state)
        state = next(s for b in range(256) if (s := feed(state, bytes([b]))) and min_len(s) == need - 1)
        steps += 1
    return steps


@pytest.mark.parametrize("schema, value", [
    ("person", {"name": 'Ada "A" \\ é 東', "age": -3, "tags": ["x"]}),
    ("person", {"name": "", "age": 0, "height": 1.5e-3, "tags": ["a", "b", "c"], "pet": None, "mood": 3}),
    ("nested", {"a": {"b": [{"c": True}, {"c": False}]}, "n": 7}),
    ("any object", {"k": [1, {"x": None}, "s", -0.5, True], "": {}}),
    ("calls", [{"name": "recipe_info", "arguments": {"recipe": "cnn-mnist"}},
               {"name": "calculator", "arguments": {"expression": "2+2"}}]),
])
@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
def test_matcher_accepts_valid_json_and_knows_the_shortest_way_to_finish(schema: str, value, separators) -> None:
    node = compile_schema(SCHEMAS[schema])
    text = json.dumps(value, ensure_ascii=False, separators=separators).encode()
    state = start_state(node)
    assert shortest_completion(state) == min_len(state) == node.min_size
    for i in range(len(text)):
        state = feed(state, text[i:i + 1])
        assert state, text[:i + 1]
        if i % 5 == 0 and not finished(state):  # min_len is exact: a completion of that length exists
            assert shortest_completion(state) == min_len(state), text[:i + 1]
    assert finished(state) and validate(node, value)
    assert not feed(state, b" ")  # nothing after the value


@pytest.mark.parametrize("schema, text", [
    ("person", b'{"age":1'),  # a required property skipped
    ("person", b'{"name":"a","age":1.5'),  # integer
    ("person", b'{"name":"a","age":1,"tags":[]'),  # minItems
    ("person", b'{"name":"a","age":1,"tags":["a","b","c",'),  # maxItems
    ("person", b'{"name":"a","age":1,"tags":["a"],"mood":"angry'),  # enum
    ("person", b'{"name":"a","age":1,"tags":["a"],"extra'),  # additional property
    ("nested", b'{"a":{"b":[{"c":true}]}'),  # two items at least
    ("calls", b'[{"name":"rm'),  # not a tool
    ("calls", b'[{"name":"calculator","arguments":{"recipe'),  # the other tool's arguments
    ("calls", b"[]"),
    ("any object", b"[1]"),  # json_object: an object
    ("any object", b'{"a":1,}'),
    ("any object", b'{"a":01'),
    ("any object", b'{"a":"line\nbreak'),  # control characters must be escaped
    ("any object", b'{"a":"\\x'),
    ("any object", b"{" + b" " * 20),  # whitespace runs are bounded
])
def test_matcher_refuses_what_breaks_the_schema(schema: str, text: bytes) -> None:
    assert not feed(start_state(compile_schema(SCHEMAS[schema])), text)


@pytest.mark.parametrize("schema, fragment", [
    ({"type": "string", "pattern": "^a"}, "'pattern' is outside the supported subset"),
    ({"$ref": "#/$defs/x"}, "'$ref' is outside"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}, "schema.properties.n: 'minimum'"),
    ({"oneOf": [{"type": "string"}]}, "'oneOf' is outside"),
    ({"type": "date"}, "'date' is not a JSON Schema type"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "maxItems"),
    ({"enum": []}, "non-empty"),
])
def test_schemas_outside_the_subset_are_refused_by_name(schema: dict, fragment: str) -> None:
    with pytest.raises(SchemaError) as err:
        compile_schema(schema)
    assert fragment in str(err.value)
    if "outside" in fragment:
        compile_schema(schema, strict=False)  # lenient (auto tool calls): checked more loosely, not refused


# --- constrained decoding on the tiny random model --------------------------------------------------------------


@pytest.mark.parametrize("schema", ["person", "nested", "any object"])
def test_constrained_replies_always_parse_and_match(engine: Engine, schema: str) -> None:
    node = compile_schema(SCHEMAS[schema])
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[schema]}}
    # the shortest budget that fits (the end is forced), a few more, and room to wander; greedy and sampled
    for seed, (max_tokens, temperature) in enumerate([(node.min_size, 1.0), (node.min_size + 5, 0.0),
                                                      (node.min_size + 5, 1.5), (120, 1.0), (120, 0.7)]):
        text, finish = generate(engine, {"response_format": fmt, "max_tokens": max_tokens,
                                         "temperature": temperature, "seed": seed, "top_p": 0.95})
        value = json.loads(text)
        assert validate(node, value), text
        assert finish == "stop", text  # the reply ends with the value, not with the budget


def test_unconstrained_tiny_model_writes_no_json(engine: Engine) -> None:
    """The control: without the mask the same model does not produce JSON, so the test above can fail."""
    text, _ = generate(engine, {"max_tokens": 40, "temperature": 1.0, "seed": 0})
    with pytest.raises(ValueError):
        json.loads(text)


# --- through the openai client ---------------------------------------------------------------------------------


def test_tool_call_round_trips_through_the_openai_client(client: openai.OpenAI, engine: Engine) -> None:
    tools = [CALC, INFO]
    reply = client.chat.completions.create(model=engine.name, messages=ASK, tools=tools, tool_choice="required",
                                           max_tokens=80, seed=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    for call in calls:  # the arguments are a JSON string that matches the tool's parameters
        schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name)
        assert validate(compile_schema(schema), json.loads(call.function.arguments))
    # the tool role on the way back: the call and its result in the history, the model answers
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]}] + [
        {"role": "tool", "tool_call_id": c.id, "content": "4"} for c in calls]
    again = client.chat.completions.create(model=engine.name, messages=history, tools=tools, tool_choice="none",
                                           max_tokens=8, seed=0)
    assert again.choices[0].message.tool_calls is None and again.choices[0].finish_reason in ("stop", "length")


def test_named_function_and_streaming(client: openai.OpenAI, engine: Engine) -> None:
    named = {"type": "function", "function": {"name": "recipe_info"}}
    reply = client.chat.completions.create(model=engine.name, messages=ASK, tools=[CALC, INFO], tool_choice=named,
                                           max_tokens=80, seed=1)
    calls = reply.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["recipe_info"]
    assert json.loads(calls[0].function.arguments)["recipe"] in ("mlp", "cnn-mnist")
    chunks = list(client.chat.completions.create(model=engine.name, messages=ASK, tools=[CALC, INFO],
                                                 tool_choice=named, max_tokens=80, seed=1, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [t for d in deltas for t in d.tool_calls or []]
    assert [(t.index, t.function.name, t.function.arguments) for t in streamed] == [
        (0, "recipe_info", calls[0].function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


@pytest.mark.parametrize("fmt", [{"type": "json_object"},
                                 {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["person"]}}])
def test_response_format_through_the_openai_client(client: openai.OpenAI, engine: Engine, fmt: dict) -> None:
    for stream in (False, True):
        kwargs = dict(model=engine.name, messages=ASK, response_format=fmt, max_tokens=100, seed=3)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                stream=True, **kwargs) if c.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        value = json.loads(text)
        assert isinstance(value, dict) and validate(compile_schema(fmt.get("json_schema", {}).get(
            "schema", {"type": "object"})), value)


def test_auto_replies_are_calls_only_when_they_parse() -> None:
    req = parse_request({"model": "m", "messages": ASK, "tools": [CALC, INFO]}, "m")
    content, calls = parse_reply('Sure. <tool_call>[{"name": "calculator", "arguments": {"expression": "2+2"}}]'
                                 "</tool_call>", req)
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["calculator"]
    hermes = ('<tool_call>\n{"name": "recipe_info", "arguments": {"recipe": "mlp"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}\n</tool_call>')
    assert [c["function"]["name"] for c in parse_reply(hermes, req)[1]] == ["recipe_info", "calculator"]
    for text in ('<tool_call>[{"name": "rm", "arguments": {}}]</tool_call>',  # not a tool
                 '<tool_call>[{"name": "calculator", "arguments": {"expr": "1"}}]',  # wrong arguments
                 '<tool_call>[{"name": "calculator", "arguments": {"expression": "1"}',  # cut short
                 '<tool_call>[{"name": "recipe_info", "arguments": {"recipe": "gpt"}}]',  # not in the enum
                 "4, of course."):
        assert parse_reply(text, req) == (text, [])
    assert parse_reply("<tool_call>[]</tool_call>", req) == ("", [])  # no tool applies


def test_a_template_that_knows_tools_renders_them_itself(engine: Engine) -> None:
    tokenizer = engine.loaded.tokenizer
    template = ("{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}"
                "<|im_end|>\n{% endif %}" + CHATML.replace("message['content']", "(message['content'] or '')"))
    history = ASK + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "calculator", "arguments": '{"expression": "2+2"}'}}]}, {"role": "tool", "tool_call_id": "c1",
                                                                          "content": "4"}]
    req = parse_request({"model": "m", "messages": history, "tools": [CALC, INFO]}, "m")
    plain = chat_prompt(tokenizer, req)  # CHATML knows no tools: they go into a system message we write
    assert "<tools>" in plain and '<tool_call>[{"name": "calculator"' in plain and "<tool_response>\n4\n" in plain
    tokenizer.chat_template = template
    try:
        native = chat_prompt(tokenizer, req)
    finally:
        tokenizer.chat_template = CHATML
    assert native.startswith("<|im_start|>system\nTOOLS: calculator recipe_info") and "<tools>" not in native
    assert "<|im_start|>tool\n4<|im_end|>" in native


# --- bad input: OpenAI-shaped 4xx, and the server keeps serving -------------------------------------------------


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


CALL = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1"}'}}
BAD = {  # (fields of the body, a fragment of the message, its param)
    "unknown tool named": ({"tools": [CALC], "tool_choice": {"type": "function", "function": {"name": "shell"}}},
                           "names the function 'shell', which is not among the tools (calculator)", "tool_choice"),
    "tool_choice without tools": ({"tool_choice": "required"}, "tool_choice needs tools", "tool_choice"),
    "tool_choice a number": ({"tools": [CALC], "tool_choice": 3}, "tool_choice must be", "tool_choice"),
    "arguments not JSON": ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        CALL | {"function": {"name": "calculator", "arguments": "{expression: 1}"}}]}]},
        "messages[1].tool_calls[0].function.arguments is not JSON", "messages[1].tool_calls[0].function.arguments"),
    "arguments an object, not a string": ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        CALL | {"function": {"name": "calculator", "arguments": {"expression": "1"}}}]}]},
        "with arguments as a JSON string", "messages[1].tool_calls[0]"),
    "arguments a JSON list": ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        CALL | {"function": {"name": "calculator", "arguments": "[1]"}}]}]},
        "must be a JSON object", "messages[1].tool_calls[0].function.arguments"),
    "arguments NaN": ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        CALL | {"function": {"name": "calculator", "arguments": '{"x": NaN}'}}]}]},
        "is not JSON (The request body contains NaN", "messages[1].tool_calls[0].function.arguments"),
    "tool result for no call": ({"messages": ASK + [{"role": "tool", "tool_call_id": "c9", "content": "4"}]},
                                "tool_call_id 'c9' is not a call of the assistant message before it",
                                "messages[1].tool_call_id"),
    "tool result for another call": ({"messages": ASK + [{"role": "assistant", "tool_calls": [CALL]},
                                                         {"role": "tool", "tool_call_id": "c2", "content": "4"}]},
                                     "'c2' is not a call", "messages[2].tool_call_id"),
    "schema outside the subset": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"d": {"type": "string", "format": "date"}}}}}},
        "response_format.json_schema.schema.properties.d: 'format' is outside the supported subset",
        "response_format.json_schema.schema"),
    "tool parameters outside the subset, forced": ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}}],
        "tool_choice": "required"}, "tools[0].function.parameters.properties.n: 'minimum' is outside",
        "tools[0].function.parameters"),
    "schema root not an object": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array"}}}}, "root of response_format's schema must be an object",
        "response_format.json_schema.schema"),
    "response_format unknown": ({"response_format": {"type": "yaml"}}, "response_format must be", "response_format"),
    "tool name with spaces": ({"tools": [{"type": "function", "function": {"name": "rm -rf"}}]},
                              "a name is 1-64 letters", "tools[0].function.name"),
    "tools twice": ({"tools": [CALC, CALC]}, "'calculator' is given twice", "tools[1].function.name"),
    "tools an object": ({"tools": {"calculator": {}}}, "tools must be a list", "tools"),
    "tool without function": ({"tools": [{"type": "function"}]}, "tools must be a list", "tools[0]"),
    "max_tokens below the shortest call": ({"tools": [CALC], "tool_choice": "required", "max_tokens": 5},
                                           "shortest JSON the schema allows needs 53", "max_tokens"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_tool_requests_get_openai_shaped_errors(url: str, client: openai.OpenAI, engine: Engine,
                                                     case: str) -> None:
    fields, fragment, param = BAD[case]
    code, reply = post(url, {"model": engine.name, "messages": ASK} | fields)
    assert code == 400, reply
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert fragment in reply["error"]["message"] and reply["error"]["param"] == param, reply
    assert client.chat.completions.create(model=engine.name, messages=ASK, max_tokens=2).choices  # still serving


def test_lenient_tool_parameters_when_the_model_chooses(url: str, engine: Engine) -> None:
    """With tool_choice auto nothing is constrained, so keywords outside the subset are accepted (not enforced)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}}
    code, reply = post(url, {"model": engine.name, "messages": ASK, "tools": [tool], "max_tokens": 2})
    assert code == 200, reply


# --- the local tools ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expression, value", [("17 * 23", "391"), ("(3 + 4) * 12.5", "87.5"), ("sqrt(144)", "12"),
                                               ("2 ** 10", "1024"), ("8500 // 128", "66"), ("17 × 23", "391"),
                                               ("1 / 3", "0.3333333333"), ("(-2) ^ 2", "4"), ("round(pi, 2)", "3.14")])
def test_calculator(expression: str, value: str) -> None:
    assert toolbox.calculator(expression) == value


@pytest.mark.parametrize("expression, fragment", [
    ("__import__('os').system('id')", "is not allowed"), ("open('/etc/passwd')", "is not allowed"),
    ("(1).__class__", "is not allowed"), ("9 ** 9 ** 9", "exponent 387420489 is larger"),
    ("10 ** 999 * 10 ** 999", "more than 400 digits"), ("1 / 0", "division by zero"), ("sqrt(-1)", "cannot compute"),
    ("2 +", "not an arithmetic expression"), ("1" * 300, "longer than 200"), ("", "empty"),
])
def test_calculator_refuses_code_and_huge_numbers(expression: str, fragment: str) -> None:
    with pytest.raises(toolbox.ToolError) as err:
        toolbox.calculate(expression)
    assert fragment in str(err.value)


def test_catalog_tools_and_their_errors() -> None:
    assert toolbox.run_tool("recipe_info", '{"recipe": "cnn-mnist"}').startswith("cnn-mnist: CNN on MNIST")
    assert "cnn-mnist" in toolbox.run_tool("find_recipes", '{"tag": "vision"}')
    assert "Did you mean 'cnn-mnist'" in toolbox.run_tool("recipe_info", '{"recipe": "cnn-mnst"}')
    assert toolbox.run_tool("shell", "{}").startswith("error: there is no tool 'shell'")
    assert toolbox.run_tool("calculator", "{expression").startswith("error: the arguments are not JSON")
    assert toolbox.run_tool("calculator", '{"expr": "1"}').startswith('error: calculator takes {"expression"')
    assert toolbox.run_tool("calculator", '{"expression": "os.system(1)"}').startswith("error: ")
    spec = toolbox.specs(["recipe_info"])[0]["function"]["parameters"]["properties"]["recipe"]
    assert "cnn-mnist" in spec["enum"]  # a constrained call can only name a recipe that exists


# --- llm-chat --tools -----------------------------------------------------------------------------------------


def test_llm_chat_runs_the_tool_loop(smoke_run, url: str, capsys: pytest.CaptureFixture) -> None:
    """Against a server started apart (as Ollama would be): a forced first call, its result, then an answer."""
    metrics, run_dir = smoke_run("llm-chat", base_url=url, api_key=KEY, tiny=False, prompt="What is 2 + 2?",
                                 tools="calculator", tool_choice="required", max_tokens=60, tool_rounds=1)
    assert metrics["turns"] == 1 and metrics["tool_calls"] >= 1
    out = capsys.readouterr().out
    assert any(line.startswith("[calculator({") for line in out.splitlines()), out
    assert json.loads((run_dir / "transcript.jsonl").read_text())["tool_calls"] == metrics["tool_calls"]


@pytest.mark.parametrize("args, fragment", [(["--tools", "calculatr"], "--tools: there is no tool 'calculatr'"),
                                            (["--tool-choice", "maybe"], "--tool-choice"),
                                            (["--tool-rounds", "0"], "--tool-rounds must be positive")])
def test_llm_chat_bad_tool_flags(invoke, args: list[str], fragment: str) -> None:
    assert_one_line_error(invoke("run", "llm-chat", "--prompt", "hi", *args), fragment)


def test_the_shipped_tool_prompts_expect_calls_the_tools_accept() -> None:
    """data/tool-prompts: checksummed, 30 prompts, every expected call valid for the tools (what bench_tools
    scores against), and the calculator's expected expressions compute."""
    from dlnotes.datasets import data_root, verify_checksums

    folder = data_root() / "tool-prompts"
    verify_checksums(folder, "restore it")
    rows = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and len({r["prompt"] for r in rows}) == 30
    schemas = {t["function"]["name"]: compile_schema(t["function"]["parameters"])
               for t in toolbox.specs(list(toolbox.NAMES))}
    for row in rows:
        call = row["call"]
        assert validate(schemas[call["name"]], call["arguments"]), row
        assert not toolbox.run_tool(call["name"], json.dumps(call["arguments"])).startswith("error"), row


def test_a_vocabulary_that_cannot_spell_the_closing_bytes_is_refused(engine: Engine) -> None:
    from dataclasses import replace

    from dlnotes.llm.guide import spells, vocabulary

    vocab = vocabulary(engine.loaded.tokenizer, engine.loaded.model.config.vocab_size)
    node = compile_schema({"type": "object", "properties": {"é": {"enum": ["ü"]}}, "required": ["é"]})
    assert spells(vocab, node)  # byte-level BPE: every byte is a token
    assert not spells(replace(vocab, singles=vocab.singles - {ord("}")}), node)
    assert not spells(replace(vocab, singles=vocab.singles - {"ü".encode()[1]}), node)
