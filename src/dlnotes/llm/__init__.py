"""Local chat models and the OpenAI-compatible server of `dlnotes serve`, one job per module.

    models     where a model is, how it loads, the cached conversion of a GGUF file
    tiny       a tiny random llama with its own tokenizer, for tests and smoke runs
    decoders   the forward passes: the prompt once, then one token per step (the hand-written llama step)
    quantized  4-bit weight groups as a Q4 GGUF stores them, and the int4 product the torch step reads
    native     the whole decoding step in C (llama_step.c) on the GGUF's own blocks: built on first use, x86 AVX2
    sampling   logits -> a token, tokens -> text as they come, stop strings
    engine     the decoding loop behind a lock, requests waiting in line: a request -> pieces of text
    schema     the HTTP request checked field by field, OpenAI's error shape, usage, the server's Limits
    tools      OpenAI's tools into the prompt (the chat template's way, or SmolLM2's), calls back out of the reply
    constrained  a JSON Schema subset compiled, and a matcher over bytes: what may come next, how to finish
    guide      the tokens a JSON reply or a forced call may take, from the matcher and the vocabulary's bytes
    toolbox    the local tools of `llm-chat --tools`: a calculator (no eval), lookups in the catalog
    app        the FastAPI routes, streaming as server-sent events; Host/Origin/key checks, a bounded queue
    server     `dlnotes serve` and BackgroundServer: bind, load, run, stop
    llama_bench  llama.cpp's own benchmark, the yardstick of serving speed: where it is, one run of it

The same llama decoding step, written for reading rather than speed, is the recipe `llama-decode`.
Importing the package imports nothing; each module is imported where it is used.
"""
