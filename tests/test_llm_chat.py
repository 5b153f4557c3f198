"""The llm-chat recipe: one-shot and interactive, embedded server or an external one, and its clear errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from dlnotes import catalog
from dlnotes.cli import app
from dlnotes.llm.server import BackgroundServer, load_engine

runner = CliRunner()


@pytest.fixture(scope="module")
def external_url():
    """A server started apart from the recipe, like Ollama would be, with its own key."""
    with BackgroundServer(load_engine(tiny=True), api_key="outside-key") as url:
        yield url


@pytest.fixture
def recipe():
    return catalog.load_module(catalog.get("llm-chat"))



def test_one_shot_prompt_streams_and_records_the_turn(smoke_run, capsys: pytest.CaptureFixture) -> None:
    metrics, run_dir = smoke_run("llm-chat", prompt="Hello there", max_tokens=12, temperature=0)
    assert metrics["turns"] == 1 and 0 < metrics["tokens"] <= 12
    assert metrics["ttft_s"] > 0
    turn = json.loads((run_dir / "transcript.jsonl").read_text())
    assert turn["user"] == "Hello there" and turn["assistant"] in capsys.readouterr().out


def test_interactive_chat_keeps_history_and_resets(smoke_run, recipe, monkeypatch: pytest.MonkeyPatch) -> None:
    typed = iter(["first question", "second question", "/reset", "third question", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    sent = []
    real_turn = recipe.chat_turn

    def spy(client, model, history, cfg, seed):
        sent.append([m["role"] for m in history])
        return real_turn(client, model, history, cfg, seed)

    monkeypatch.setattr(recipe, "chat_turn", spy)
    metrics, run_dir = smoke_run("llm-chat", prompt="", max_tokens=4, system="Be brief.")
    assert metrics["turns"] == 3
    assert sent == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert len((run_dir / "transcript.jsonl").read_text().splitlines()) == 3


def test_end_of_input_ends_the_chat(smoke_run, monkeypatch: pytest.MonkeyPatch) -> None:
    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    metrics, _ = smoke_run("llm-chat", prompt="")
    assert metrics == {"turns": 0}


def test_external_server_with_key_from_the_environment(smoke_run, external_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "outside-key")
    metrics, _ = smoke_run("llm-chat", base_url=external_url, tiny=False, prompt="Hi", max_tokens=5)
    assert metrics["turns"] == 1 and metrics["tokens"] <= 5


# --- bad input: one clear line ------------------------------------------------------------------------------


def test_unreachable_server(out_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    result = runner.invoke(app, ["run", "llm-chat", "--base-url", f"http://127.0.0.1:{port}/v1", "--prompt", "hi",
                                 "--out", str(out_dir)])
    assert_one_line_error(result, "Cannot reach", "Is the server running")


def test_unknown_model_on_the_server(external_url: str, out_dir: Path) -> None:
    result = runner.invoke(app, ["run", "llm-chat", "--base-url", external_url, "--api-key", "outside-key",
                                 "--model", "qwen2.5:3b", "--prompt", "hi", "--out", str(out_dir)])
    assert_one_line_error(result, "Model 'qwen2.5:3b' not found", "tiny-random-llama")


def test_wrong_api_key(external_url: str, out_dir: Path) -> None:
    result = runner.invoke(app, ["run", "llm-chat", "--base-url", external_url, "--api-key", "wrong",
                                 "--prompt", "hi", "--out", str(out_dir)])
    assert_one_line_error(result, "Incorrect API key")


def test_server_side_errors_become_one_line(recipe, external_url: str, out_dir: Path) -> None:
    from dlnotes.errors import UserError

    cfg = recipe.Config(base_url=external_url, api_key="outside-key", prompt="word " * 400, max_tokens=100,
                        out=str(out_dir))
    with pytest.raises(UserError, match="answered 400: The prompt is .* tokens"):
        recipe.main(cfg)


@pytest.mark.parametrize("flag, value, fragment", [("--temperature", "-1", "--temperature must be 0 or more"),
                                                   ("--max-tokens", "0", "--max-tokens must be positive")])
def test_bad_flags(flag: str, value: str, fragment: str) -> None:
    assert_one_line_error(runner.invoke(app, ["run", "llm-chat", flag, value]), fragment)


def test_missing_local_model_for_the_embedded_server(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "llm-chat", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert_one_line_error(result, "does not exist")
