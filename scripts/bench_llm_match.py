"""Do the server's greedy replies match the fp32 model's? Token by token, for a few prompts.

    .venv/bin/python scripts/bench_llm_match.py [--tokens 100] [--eager]

The reference is transformers' `model.generate(do_sample=False)` on the fp32 SmolLM2-135M-Instruct; the
candidate is the server's decoder (fp16 weights, the hand-written decoding step) choosing the most likely
token each time, as the server does at temperature 0. Prints, per prompt, how many leading tokens agree.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported, as dlnotes' CLI does

PROMPTS = [
    "Write a short story about a robot who paints.",
    "What is the capital of France?",
    "Explain how a rainbow forms.",
    "Give me three tips for learning to code.",
    "Describe the water cycle to a ten-year-old.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--eager", action="store_true", help="the hand-written step without torch.compile")
    args = parser.parse_args()

    import torch

    from dlnotes.llm.decoders import HFDecoder, LlamaDecoder
    from dlnotes.llm.engine import Engine
    from dlnotes.llm.models import load
    from dlnotes.llm.schema import ChatRequest

    def greedy(decoder: LlamaDecoder | HFDecoder, ids: list[int], eos: set[int]) -> list[int]:
        out: list[int] = []
        logits = decoder.prefill(ids, max_len=len(ids) + args.tokens)
        while len(out) < args.tokens and (token := int(logits.argmax())) not in eos:
            out.append(token)
            logits = decoder.step(token)
        return out

    loaded = load("", "cpu")
    engine = Engine(loaded)
    if args.eager:
        engine.decoder = LlamaDecoder(loaded.model, compile=False)
    total = agree = 0
    for prompt in PROMPTS:
        req = ChatRequest(messages=[{"role": "user", "content": prompt}], max_tokens=args.tokens, temperature=0)
        ids, _ = engine.check_budget(req)
        with torch.inference_mode():
            ref = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        do_sample=False, max_new_tokens=args.tokens)[0, len(ids):].tolist()
        ref = [t for t in ref if t not in engine.eos]  # generate() appends the end token
        with torch.inference_mode():
            got = greedy(engine.decoder, ids, engine.eos)
        same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        total, agree = total + len(ref), agree + same
        print(f"{same}/{len(ref)} tokens agree{'' if got == ref else ' (then they differ)'}: {prompt!r}")
    print(f"{agree}/{total} tokens agree")


if __name__ == "__main__":
    main()
