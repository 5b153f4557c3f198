"""How often does the served model call a tool correctly, with and without constrained decoding?

    python scripts/bench_tools.py                 # SmolLM2-135M-Instruct on data/tool-prompts (30 prompts)
    python scripts/bench_tools.py --tiny --limit 3   # the tiny random model: checks the script itself
    python scripts/bench_tools.py --out r.jsonl      # each reply as a JSON line; --summary r.jsonl: the table again

Each prompt of data/tool-prompts/prompts.jsonl expects one call (a tool and its arguments) to the three
tools of `llm-chat --tools all`. Every prompt is answered greedily three ways, in-process (the server's own
Engine, no HTTP), with the same tools in the prompt:

    auto        tool_choice "auto": the model writes what it wants; a call is recognized in the text
    prefix      the prompt ends with "<tool_call>" as for a forced call, but decoding is free
    constrained tool_choice "required": the same prompt, decoding masked to the calls' JSON schema

valid: the reply is a call that parses, names a tool and has arguments that match its schema.
correct: the expected tool with the expected arguments (the calculator's expression by its value).
tokens/s: completion tokens over decoding time (prefill excluded), so the constraint's cost shows as
the ratio of constrained to prefix. Measured on whatever else the machine is doing: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import threading
import time
from pathlib import Path

from dlnotes.datasets import data_root, verify_checksums
from dlnotes.llm import toolbox
from dlnotes.llm.schema import parse_request
from dlnotes.llm.server import load_engine
from dlnotes.llm.tools import parse_reply


def load_prompts(limit: int = 0, ids: str = "") -> list[dict]:
    folder = data_root() / "tool-prompts"
    verify_checksums(folder, "restore data/tool-prompts from the repository.")
    rows = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines() if line.strip()]
    if ids:  # e.g. "13,23,2": these prompts, in this order
        by_id = {r["id"]: r for r in rows}
        rows = [by_id[int(i)] for i in ids.split(",")]
    return rows[:limit] if limit else rows


def correct(call: dict, expected: dict) -> bool:
    name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
    if name != expected["name"]:
        return False
    if name == "calculator":
        try:
            got, want = toolbox.calculate(args["expression"]), toolbox.calculate(expected["arguments"]["expression"])
        except toolbox.ToolError:
            return False
        return math.isclose(got, want, rel_tol=1e-9)
    return args == expected["arguments"]


def answer(engine, row: dict, mode: str, max_tokens: int) -> tuple[list[dict], str, int, float]:
    """(calls, text, completion tokens, decoding seconds) of one prompt in one mode."""
    body = {"model": engine.name, "messages": [{"role": "user", "content": row["prompt"]}],
            "tools": toolbox.specs(list(toolbox.NAMES)), "max_tokens": max_tokens, "temperature": 0,
            "tool_choice": "auto" if mode == "auto" else "required",
            "stop": ["</tool_call>"]}  # free replies end with the call (a constrained one ends with its JSON)
    req = parse_request(body, engine.name)
    if mode == "prefix":
        req.grammar = None  # the same prompt, ending in "<tool_call>", decoded freely
    ids, budget = engine.check_budget(req)
    pieces, first = [], None
    for piece in engine.generate(req, ids, budget, threading.Event()):
        first = first or time.perf_counter()  # the first piece comes after the prefill
        pieces.append(piece)
    text = "".join(p.text for p in pieces)
    _, calls = parse_reply(text, req)
    tokens = pieces[-1].completion_tokens
    return calls, text, tokens, time.perf_counter() - (first or time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="a .gguf file or model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (checks the script)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    parser.add_argument("--ids", default="", help="only these prompt ids, in this order (e.g. 13,23,2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="a call is about 25 tokens; a forced one needs "
                        "as many tokens as bytes in its shortest form (53 here)")
    parser.add_argument("--modes", default="constrained,auto,prefix")
    parser.add_argument("--out", default="", help="write each reply here as JSON lines")
    parser.add_argument("--summary", default="", help="print the table of an --out file (of a run cut short too)")
    args = parser.parse_args()
    if args.summary:
        lines = [json.loads(line) for line in Path(args.summary).read_text().splitlines() if line.strip()]
        table([r for r in lines if r["mode"] in args.modes.split(",")], args.modes.split(","), args.summary)
        return
    if args.tiny:
        from dlnotes.llm.engine import Engine
        from dlnotes.llm.tiny import tiny_model

        engine = Engine(tiny_model(context=4096))  # the tools' description is ~1,000 of its tokens
    else:
        engine = load_engine(args.model, "cpu")
    rows = load_prompts(args.limit, args.ids)
    modes = args.modes.split(",")
    results = []
    log = open(args.out, "w") if args.out else None
    for row in rows:
        for mode in modes:
            calls, text, tokens, seconds = answer(engine, row, mode, args.max_tokens)
            good = len(calls) >= 1 and correct(calls[0], row["call"])
            results.append({"id": row["id"], "mode": mode, "text": text, "calls": calls, "correct": good,
                            "tokens": tokens, "seconds": seconds})
            mark = f"{'valid' if calls else '-':<5} {'correct' if good else '':<7}"
            print(f"{row['id']:>3} {mode:<11} {mark} {text[:90]!r}", flush=True)
            if log:
                log.write(json.dumps(results[-1]) + "\n")
                log.flush()
    table(results, modes, f"{engine.name}, greedy, max_tokens {args.max_tokens}")


def table(results: list[dict], modes: list[str], what: str) -> None:
    """Valid and correct calls, and decoding speed, per mode, over the prompts answered in every mode."""
    done = {r["id"] for r in results if all(any(q["id"] == r["id"] and q["mode"] == m for q in results)
                                           for m in modes)}
    n = len(done)
    print(f"\n{what}: {n} prompts, measured on {platform.processor() or platform.machine()}")
    print("| mode | valid calls | correct calls | tokens/s (decode) |\n|---|---|---|---|")
    speed = {}
    for mode in modes:
        rows = [r for r in results if r["mode"] == mode and r["id"] in done]
        tokens = sum(max(r["tokens"] - 1, 0) for r in rows)  # the first token comes with the prefill
        speed[mode] = tokens / max(sum(r["seconds"] for r in rows), 1e-9)
        print(f"| {mode} | {sum(bool(r['calls']) for r in rows)}/{n} | {sum(r['correct'] for r in rows)}/{n} "
              f"| {speed[mode]:.1f} |")
    if "prefix" in speed and "constrained" in speed and speed["prefix"]:
        print(f"constrained / prefix tokens/s: {speed['constrained'] / speed['prefix']:.2f}")


if __name__ == "__main__":
    main()
