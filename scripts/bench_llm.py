"""Time greedy decoding of SmolLM2-135M-Instruct on this machine, without HTTP: the numbers in the README's
"Measured" table.

    .venv/bin/python scripts/bench_llm.py                 through the server's Engine (sampling, detokenizing)
    .venv/bin/python scripts/bench_llm.py --raw           decoder.prefill / decoder.step alone, argmax
    .venv/bin/python scripts/bench_llm.py --eager         the hand-written step without torch.compile
    .venv/bin/python scripts/bench_llm.py --hf            transformers' own forward (HFDecoder), fp32

Threads and OpenMP's wait policy are set as the CLI sets them (2 threads, OMP_WAIT_POLICY=PASSIVE).
The machine's 1-minute load average is printed with each run: measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported, as dlnotes' CLI does

PROMPT = "Write a short story about a robot who paints."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--raw", action="store_true", help="time the decoder alone")
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--hf", action="store_true", help="transformers' forward instead of the hand-written step")
    args = parser.parse_args()

    import torch

    from dlnotes.llm.decoders import HFDecoder, LlamaDecoder
    from dlnotes.llm.engine import Engine
    from dlnotes.llm.models import load
    from dlnotes.llm.schema import ChatRequest

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    loaded = load("", "cpu")
    print(f"model loaded in {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    engine = Engine(loaded)
    if args.hf or args.eager:
        engine.decoder = HFDecoder(loaded.model) if args.hf else LlamaDecoder(loaded.model, compile=False)
    print(f"{type(engine.decoder).__name__} ready in {time.perf_counter() - start:.1f} s", flush=True)
    req = ChatRequest(messages=[{"role": "user", "content": args.prompt}], max_tokens=args.tokens, temperature=0)
    ids, budget = engine.check_budget(req)
    for repeat in range(args.repeats + 1):  # the first run warms up
        start, cpu = time.perf_counter(), time.process_time()
        if args.raw:
            with torch.inference_mode():
                token = int(engine.decoder.prefill(ids, len(ids) + budget).argmax())
                first = time.perf_counter()
                for _ in range(budget - 1):
                    token = int(engine.decoder.step(token).argmax())
            n = budget
        else:
            first = None
            for piece in engine.generate(req, ids, budget, threading.Event()):
                first = first or time.perf_counter()
                n = piece.completion_tokens  # set on the last piece
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
        decode = (n - 1) / (total - (first - start))
        label = "warm-up" if repeat == 0 else f"run {repeat}"
        print(f"{label}: {n} tokens, first after {first - start:.3f} s, then {decode:.1f} tokens/s "
              f"({cpu / n * 1e3:.1f} ms CPU a token), load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
