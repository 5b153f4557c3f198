"""Time greedy decoding of SmolLM2-135M-Instruct on this machine, without HTTP, next to llama.cpp; check quality.

    .venv/bin/python scripts/bench_llm.py                 through the server's Engine (sampling, detokenizing)
    .venv/bin/python scripts/bench_llm.py --raw           decoder.prefill / decoder.step alone, argmax
    .venv/bin/python scripts/bench_llm.py --torch-step    the torch step (int4 kernel, torch.compile) instead of C
    .venv/bin/python scripts/bench_llm.py --eager         the torch step without torch.compile
    .venv/bin/python scripts/bench_llm.py --hf            transformers' own forward (HFDecoder), fp32
    .venv/bin/python scripts/bench_llm.py --weights fp16  the decoder's matrices in fp16 instead of auto (int4)
    ... --llama-bench /tmp/llama-bench-bin/llama-bench    llama.cpp's llama-bench on the same GGUF, before and
                                                          after ours, in this same invocation: the ratio
    ... --ttft 1000                                       time to first token of a 1,000-token prompt
    ... --quality                                         held-out perplexity and greedy replies against fp32

Threads and OpenMP's wait policy are set as the server sets them (2 threads, both decoding; idle threads spin
briefly on a quiet machine, sleep at once on a busy one, and then one thread decodes: launch.serving_idle_threads).
The machine's 1-minute load average is printed with each run: on a busy machine only same-run ratios count.

--quality judges the decoder the way the field judges quantized models: perplexity on held-out English text
(Bible verses of data/bible-en-es's test split, which SmolLM2 never saw as such) next to the fp32 model's on
the same tokens, and the greedy replies to a fixed set of prompts next to fp32's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

from dlnotes.launch import serving_idle_threads

serving_idle_threads()  # before torch is imported, as dlnotes' server does

PROMPT = "Write a short story about a robot who paints."
PROMPTS = [  # the greedy spot-check (scripts/bench_llm_match.py's set)
    "Write a short story about a robot who paints.",
    "What is the capital of France?",
    "Explain how a rainbow forms.",
    "Give me three tips for learning to code.",
    "Describe the water cycle to a ten-year-old.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--raw", action="store_true", help="time the decoder alone")
    parser.add_argument("--torch-step", action="store_true", help="the torch step instead of the C one (native.py)")
    parser.add_argument("--eager", action="store_true", help="the torch step without torch.compile")
    parser.add_argument("--hf", action="store_true", help="transformers' forward instead of the hand-written step")
    parser.add_argument("--weights", default="auto", help="the hand-written step's matrices: auto | fp16 | int4")
    parser.add_argument("--llama-bench", default="", help="llama.cpp's llama-bench binary: run it side by side")
    parser.add_argument("--ttft", type=int, default=0, help="also time the first token of a prompt this long")
    parser.add_argument("--quality", action="store_true", help="perplexity and greedy replies against fp32")
    parser.add_argument("--ppl-tokens", type=int, default=1024, help="held-out tokens for the perplexity")
    args = parser.parse_args()

    import torch

    from dlnotes.llm.decoders import HFDecoder, LlamaDecoder
    from dlnotes.llm.engine import Engine
    from dlnotes.llm.models import default_gguf, load

    torch.set_num_threads(args.threads)
    anchor = [llama_bench(args.llama_bench, default_gguf(), args.threads)] if args.llama_bench else []
    start = time.perf_counter()
    loaded = load("", "cpu")
    print(f"model loaded in {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    engine = Engine(loaded)
    if args.hf or args.eager or args.torch_step or args.weights != "auto":
        engine.decoder = (HFDecoder(loaded.model) if args.hf else
                          LlamaDecoder(loaded.model, compile=not args.eager, weights=args.weights, c_step=False))
    weights = getattr(engine.decoder, "weights", "fp32")
    step = ("transformers' forward" if isinstance(engine.decoder, HFDecoder) else
            "C step" if engine.decoder.native else "torch step")
    print(f"{type(engine.decoder).__name__} ({weights} weights, {step}) ready in {time.perf_counter() - start:.1f} s",
          flush=True)
    speeds = time_generation(engine, args)
    if args.ttft:
        time_long_prompt(engine, args.ttft)
    if args.llama_bench:
        anchor.append(llama_bench(args.llama_bench, default_gguf(), args.threads))
        gen = statistics.median(a[1] for a in anchor)
        pp = statistics.median(a[0] for a in anchor)
        print(f"llama.cpp (before, after): generation {', '.join(f'{a[1]:.1f}' for a in anchor)} tokens/s, "
              f"prompt {', '.join(f'{a[0]:.0f}' for a in anchor)} tokens/s")
        print(f"ours: generation median {statistics.median(speeds):.1f} tokens/s = "
              f"{statistics.median(speeds) / gen:.2f}x llama.cpp's {gen:.1f} (prompt processing {pp:.0f} tokens/s)")
    if args.quality:
        check_quality(engine, args.ppl_tokens, args.tokens)


def time_generation(engine, args) -> list[float]:
    """Greedy decoding of `args.tokens` tokens, a warm-up then `args.repeats` runs: tokens/s after the first."""
    import torch

    from dlnotes.llm.schema import ChatRequest

    req = ChatRequest(messages=[{"role": "user", "content": args.prompt}], max_tokens=args.tokens, temperature=0)
    ids, budget = engine.check_budget(req)
    speeds = []
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
        if repeat:
            speeds.append(decode)
        print(f"{label}: {n} tokens, first after {first - start:.3f} s, then {decode:.1f} tokens/s "
              f"({cpu / n * 1e3:.1f} ms CPU a token), load {os.getloadavg()[0]:.2f}", flush=True)
    return speeds


def time_long_prompt(engine, length: int) -> None:
    """Time to first token of a `length`-token prompt (held-out verses): the prefill, as a server sees it."""
    import torch

    ids = verse_tokens(engine.loaded.tokenizer, length)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.inference_mode():
            engine.decoder.prefill(ids, len(ids) + 1)
        times.append(time.perf_counter() - start)
    best = min(times)
    print(f"prompt of {len(ids)} tokens: first token after {', '.join(f'{t:.2f}' for t in times)} s "
          f"(best {best:.2f} s = {len(ids) / best:.0f} prompt tokens/s), load {os.getloadavg()[0]:.2f}", flush=True)


def verse_tokens(tokenizer, count: int) -> list[int]:
    """The first `count` tokens of data/bible-en-es's held-out English verses, one verse a line."""
    from dlnotes.textdata import load_translation_pairs

    text = "\n".join(en for en, _ in load_translation_pairs()["test"][:count])
    return tokenizer(text, add_special_tokens=False)["input_ids"][:count]


def check_quality(engine, tokens: int, reply_tokens: int) -> None:
    """Held-out perplexity through the decoding step (token by token, as it serves) against the fp32 model's
    forward on the same tokens; then greedy replies to PROMPTS against fp32's `generate`."""
    import math

    import torch
    import torch.nn.functional as F

    from dlnotes.llm.schema import ChatRequest

    model, decoder = engine.loaded.model, engine.decoder
    chunk = 256  # held-out tokens in windows of 256, each starting afresh
    ids = verse_tokens(engine.loaded.tokenizer, tokens)
    nll_ref = nll_ours = 0.0
    count = 0
    with torch.inference_mode():
        for at in range(0, len(ids) - 1, chunk):
            window = ids[at: at + chunk]
            if len(window) < 2:
                break
            targets = torch.tensor(window[1:])
            ref = model(torch.tensor([window])).logits[0, :-1].float()  # (T-1, V)
            ours = [decoder.prefill(window[:1], len(window))]
            ours += [decoder.step(t) for t in window[1:-1]]
            nll_ref += F.cross_entropy(ref, targets, reduction="sum").item()
            nll_ours += F.cross_entropy(torch.stack(ours), targets, reduction="sum").item()
            count += len(targets)
    ppl_ref, ppl_ours = math.exp(nll_ref / count), math.exp(nll_ours / count)
    print(f"perplexity on {count} held-out tokens: fp32 {ppl_ref:.3f}, ours {ppl_ours:.3f} "
          f"({(ppl_ours / ppl_ref - 1) * 100:+.2f} %)", flush=True)
    same = 0
    for prompt in PROMPTS:
        req = ChatRequest(messages=[{"role": "user", "content": prompt}], max_tokens=reply_tokens, temperature=0)
        ids, _ = engine.check_budget(req)
        with torch.inference_mode():
            ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=reply_tokens)[0, len(ids):].tolist()
            ref = [t for t in ref if t not in engine.eos]
            got = [int(decoder.prefill(ids, len(ids) + reply_tokens).argmax())]
            while len(got) < reply_tokens and got[-1] not in engine.eos:
                got.append(int(decoder.step(got[-1]).argmax()))
        got = [t for t in got if t not in engine.eos]
        agree = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        same += got == ref
        print(f"{agree}/{len(ref)} tokens agree with fp32{'' if got == ref else ' (then they differ)'}: {prompt!r}")
        if got != ref:
            tok = engine.loaded.tokenizer
            print(f"    fp32: {tok.decode(ref)!r}\n    ours: {tok.decode(got)!r}")
    print(f"{same}/{len(PROMPTS)} greedy replies identical to fp32's", flush=True)


def llama_bench(binary: str, gguf, threads: int) -> tuple[float, float]:
    """(prompt, generation) tokens/s from llama.cpp's `llama-bench -p 64 -n 128` on the same GGUF file."""
    from dlnotes.llm import llama_bench as anchor

    speeds = anchor.run(gguf, threads, path=binary)
    print(f"llama.cpp llama-bench -t {threads}: prompt {speeds['prompt']:.1f} tokens/s, generation "
          f"{speeds['generation']:.1f} tokens/s, load {os.getloadavg()[0]:.2f}", flush=True)
    return speeds["prompt"], speeds["generation"]


if __name__ == "__main__":
    main()
