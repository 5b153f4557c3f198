"""Decoders: a causal LM's forward pass, the prompt once (`prefill`), then one token per `step`.

    decoder = decoder_for(model)
    logits = decoder.prefill(ids, max_len)   # (V,) scores for the token after the prompt
    logits = decoder.step(token)             # (V,) after one more token; the KV cache holds all before it

`LlamaDecoder` is a llama's decoding step written out for the CPU's speed: for a Q4_1 GGUF on an x86 CPU with
AVX2, the whole step in C (`native`, the server's usual path); otherwise in torch (fused 4-bit or fp16
matrices, an in-place KV cache, torch.compile). The same step written for reading, in fp32 and top to bottom,
is the recipe `llama-decode` (`dlnotes show llama-decode`); all are tested against transformers' forward.
`HFDecoder`, transformers' own forward with its DynamicCache, serves GPUs and other architectures.
Speeds measured with scripts/bench_llm.py are in the README, with the machine they were measured on.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from dlnotes.device import cpu_threads
from dlnotes.llm import native, quantized
from dlnotes.llm.quantized import Int4Weight, Int8Rows

WEIGHTS = ("auto", "fp16", "int4")  # LlamaDecoder's matrix formats; auto: int4 where the file had 4-bit groups


def decoder_for(model: Any) -> HFDecoder | LlamaDecoder:
    """The hand-written llama step on the CPU where it applies; transformers' own forward everywhere else."""
    if next(model.parameters()).device.type == "cpu" and LlamaDecoder.supports(model):
        return LlamaDecoder(model)
    return HFDecoder(model)


class HFDecoder:
    """Any causal LM through its own forward pass and Hugging Face's DynamicCache: the GPU path, and the
    CPU path for architectures the hand-written step does not cover (fp32 there, slower than LlamaDecoder)."""

    def __init__(self, model: Any) -> None:
        self.model, self.device = model, next(model.parameters()).device

    def prefill(self, ids: list[int], max_len: int) -> torch.Tensor:
        """The whole prompt in one forward pass; the next-token logits (V,) at its last position."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        return self._next(torch.tensor([ids], device=self.device))  # (1, T)

    def step(self, token: int) -> torch.Tensor:
        """One more token (its keys and values join the cache); the logits (V,) for the one after it."""
        return self._next(torch.tensor([[token]], device=self.device))  # (1, 1)

    def _next(self, ids: torch.Tensor) -> torch.Tensor:
        # logits_to_keep=1: the prefill needs the scores of the last position only, not all T
        return self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()


Matrix = torch.Tensor | Int4Weight | Int8Rows  # fp16 (N, K) rows or (N/32, K, 32) tiles, 4-bit groups, int8 rows


class LayerWeights(NamedTuple):
    """One decoder layer's weights as the decoding step reads them: norms fp32; matrices fp16 (N, K) rows
    (eager) or (N/32, K, 32) tiles (compiled, see _tiles), or Int4Weight groups (both)."""
    attn_norm: torch.Tensor  # (D,)
    qkv: Matrix  # ((H + 2 KV) * hd, D): q, k and v projections stacked, one matrix-vector product
    o: Matrix  # (D, H * hd)
    mlp_norm: torch.Tensor  # (D,)
    gate_up: Matrix  # (2 F, D): gate and up projections stacked
    down: Matrix  # (D, F)


class LlamaDecoder:
    """A llama's decoding step written out for the CPU: one new token through every layer, after the prompt
    went through transformers' own forward.

    Generating a token reads every weight once (135M of them for SmolLM2-135M) to do 2 flops with each:
    memory traffic and per-operation overhead set the speed, not arithmetic. What each choice buys:

    - The whole step in C (`c_step=True`, native.py) for a Q4_1 file on an x86 CPU with AVX2, FMA and F16C and
      a C compiler: one call a token, the file's Q4_1 and Q8_0 blocks, fp32 activations (logits equal fp32's
      up to summation order). It replaces everything below, which is the step where the C one cannot run
      (another CPU or model format, no compiler) and the one measured against it (`bench_llm.py --torch-step`).
    - 4-bit weights where the file had them (`weights="auto"`, quantized.py): a Q4 GGUF's layer matrices stay
      the 4-bit groups they were, read by torch's int4 kernel, a quarter of fp16's bytes; nothing is rounded
      that the file had not rounded, only the kernel's bf16 input and scales. Held-out perplexity and greedy
      replies against fp32 are checked by scripts/bench_llm.py --quality (numbers in the README).
    - The output matrix (V x D, tied to the embeddings: a fifth of SmolLM2's weights) in int8 rows next to
      4-bit layers: half fp16's bytes, read by torch's weight-only int8 kernel. Its logits come back in bf16.
    - fp16 weights, fp32 arithmetic, for any other model (or `weights="fp16"`): half the bytes of fp32, and
      the greedy replies stay token for token those of the fp32 model (scripts/bench_llm_match.py checks it).
    - All cores, as llama.cpp does: each product's rows are split between torch's OpenMP threads, which spin
      between the few hundred products of a token (launch.serving_idle_threads) instead of sleeping, since
      waking a sleeping one for each costs more than it brings (so where they sleep, one thread decodes). The
      decoding thread's workers must be the only ones: the server loads and compiles in a thread of its own
      (device.in_own_thread); with workers of another thread alive, libgomp counts more threads than cores,
      cuts everyone's spinning to a few rounds, and two threads decoded slower than one.
    - Fused matrices: q, k and v stacked into one, gate and up into another: 4 products a layer, not 7.
    - A KV cache allocated once per request, (layers, 2, max_len, KV, hd), written in place: no torch.cat.
    - Grouped-query attention without copies: the H/KV query heads that share a key/value head attend as a
      (H/KV, hd) block against that head's keys, so keys and values are never repeated H/KV times.
    - torch.compile (inductor's C++ backend): a layer becomes one C++ function instead of ~40 PyTorch calls,
      whose dispatch overhead dominates eagerly. The first start compiles (seconds); later starts find the
      result in inductor's disk cache (/tmp/torchinductor_$USER). Without a working compiler the same code
      runs eagerly, with a warning.

    The prompt (prefill) goes through transformers' forward in fp32 on all threads: there each weight is
    read once for all T prompt tokens, a matrix-matrix product that the CPU's fp32 kernels do well.
    Measured speeds of each variant (scripts/bench_llm.py) are in the README."""

    def __init__(self, model: Any, compile: bool = True, weights: str = "auto", threads: int = 0,
                 c_step: bool = True) -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        self.threads = threads or decoding_threads()
        cfg = model.config
        self.model = model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        layers = model.model.layers
        matrices = [dict(
            qkv=torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                           layer.self_attn.v_proj.weight]).detach(),
            o=layer.self_attn.o_proj.weight.detach(),
            gate_up=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).detach(),
            down=layer.mlp.down_proj.weight.detach(),
        ) for layer in layers]
        # A Q4_1 file on an x86 CPU with AVX2: the whole step in C, on the file's own blocks (native.py); the
        # torch step's weights are then not made at all
        self.native = native.c_step(model, matrices, self.threads) if c_step and weights != "fp16" else None
        if self.native:
            matrices = []
        packed = None if self.native else _int4_or_none(matrices, weights)
        self.weights = "int4" if packed or self.native else "fp16"
        matrices = packed or [{name: w.to(torch.float16) for name, w in m.items()} for m in matrices]
        self.layers = [LayerWeights(attn_norm=layer.input_layernorm.weight.detach(),
                                    mlp_norm=layer.post_attention_layernorm.weight.detach(), **m)
                       for layer, m in zip(layers, matrices)]
        self.embed = model.model.embed_tokens.weight.detach()  # (V, D) fp32: one row read per token
        self.norm = model.model.norm.weight.detach()  # (D,)
        # (V, D): the largest matrix (tied to the embeddings); int8 rows next to 4-bit layers (see _int4_or_none)
        lm_head = model.lm_head.weight.detach()
        self.lm_head = (None if self.native else quantized.int8_rows(lm_head) if packed else
                        lm_head.to(torch.float16))
        # RoPE tables from transformers' own rotary embedding (covers Llama 3's rope scaling): (context, hd).
        # rotate_half(x) = cat(-x2, x1) equals roll(x, hd/2) with the first half negated: fold the sign into sin.
        positions = torch.arange(cfg.max_position_embeddings)[None]
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(self.embed[:1][None], positions)  # (1, context, hd) each
        sign = torch.ones(self.head_dim)
        sign[: self.head_dim // 2] = -1
        self.cos, self.sin = cos[0], sin[0] * sign
        self.cache = torch.empty(0)
        self.layer_fn, self.final_fn, self.compiled = _layer, _final, False
        if compile and not self.native:
            self._compile()

    @staticmethod
    def supports(model: Any) -> bool:
        """A plain llama: RMSNorm, SiLU-gated MLP, RoPE, no biases (SmolLM2, TinyLlama, Llama 2 and 3)."""
        cfg = model.config
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        return (cfg.model_type == "llama" and cfg.hidden_act == "silu" and not getattr(cfg, "attention_bias", False)
                and not getattr(cfg, "mlp_bias", False)
                and rope.get("rope_type") != "dynamic")  # its tables change with the length: not precomputable

    def prefill(self, ids: list[int], max_len: int) -> torch.Tensor:
        """The prompt through transformers' forward, its keys and values copied into a fresh cache for
        `max_len` positions; the next-token logits (V,) at its last position."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        inputs = torch.tensor([ids])  # (1, T)
        logits = self.model(input_ids=inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        # (L, 2, S, KV, hd): position-major, so a layer's keys up to a position are one (S, KV, hd) slice whose
        # strides do not depend on S or max_len (the compiled layer then fits every request)
        self.cache = torch.empty(len(cache.layers), 2, max_len, self.kv_heads, self.head_dim)
        for i, layer in enumerate(cache.layers):
            self.cache[i, 0, : len(ids)] = layer.keys[0].transpose(0, 1)  # (KV, T, hd) -> (T, KV, hd)
            self.cache[i, 1, : len(ids)] = layer.values[0].transpose(0, 1)
        self.pos = len(ids)  # where the next token goes
        return logits.float()

    def step(self, token: int) -> torch.Tensor:
        """Token at position `pos` through every layer; the logits (V,) for the token after it."""
        pos, n = self.pos, self.pos + 1
        if n > self.cache.shape[2]:
            raise ValueError(f"the KV cache holds {self.cache.shape[2]} positions; prefill with a larger max_len")
        if self.native:
            logits = self.native.step(token, pos, self.cos[pos], self.sin[pos], self.cache)
            self.pos = n
            return logits
        with cpu_threads(self.threads):  # see the class docstring
            x = F.embedding(torch.tensor([token]), self.embed)[0]  # (D,)
            cos, sin = self.cos[pos], self.sin[pos]  # (hd,)
            for i, weights in enumerate(self.layers):
                k, v = self.cache[i, 0, :n], self.cache[i, 1, :n]  # (pos + 1, KV, hd) views
                x = self.layer_fn(x, k, v, cos, sin, weights, self.heads, self.eps)
            self.pos = n
            return self.final_fn(x, self.norm, self.lm_head, self.eps)

    def _compile(self) -> None:
        """Compile now, on a 2-token prompt, rather than in the first request; fall back to eager if it fails."""
        rows, lm_head = self.layers, self.lm_head
        self.layers = [LayerWeights(w.attn_norm, _tiles(w.qkv), _tiles(w.o), w.mlp_norm, _tiles(w.gate_up),
                                    _tiles(w.down)) for w in rows]
        self.lm_head = _tiles(lm_head)
        try:
            # cpp_wrapper: the code calling a graph's kernels is C++ too, and lets go of Python's GIL while they
            # run, so the HTTP server and the client (threads of this process) work on the other core meanwhile
            self.layer_fn = torch.compile(_layer, options={"cpp_wrapper": True})
            self.final_fn = torch.compile(_final, options={"cpp_wrapper": True})
            with torch.inference_mode():  # the mode the server decodes in: compiled code is specialized on it
                self.prefill([0, 0], max_len=8)
                self.step(0)  # compiles for 3 cached positions,
                self.step(0)  # then once more for any number of them (the one recompilation a request needs)
            self.compiled = True
        except Exception as err:  # no C++ compiler, an unsupported platform or Python version
            print(f"warning: torch.compile failed ({str(err).strip().splitlines()[0][:200]}); decoding without it "
                  "(slower).", file=sys.stderr)
            self.layers, self.lm_head, self.layer_fn, self.final_fn = rows, lm_head, _layer, _final


def decoding_threads() -> int:
    """All of torch's threads where idle OpenMP threads spin (launch.serving_idle_threads); one where they sleep
    at once, since waking a sleeping thread for each of a token's few hundred products costs more than it brings."""
    return 1 if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else torch.get_num_threads()


def _int4_or_none(matrices: list[dict[str, torch.Tensor]], weights: str) -> list[dict[str, Int4Weight]] | None:
    """Every layer matrix as Int4Weight, or None (fp16 then).

    auto: int4 where the kernel runs and the file's layer matrices were 4-bit groups already (a Q4 GGUF).
    int4 forces it: a model that came in more bits is rounded to 4 (for measuring; its quality is not checked).
    The output matrix is not among them: SmolLM2's file keeps it in 8 bits (Q8_0), and rounding it to 4 bits
    raised held-out perplexity far beyond the 1 % that the layers' 4 bits cost (README); next to 4-bit layers it
    becomes int8 rows instead (quantized.int8_rows), next to fp16 layers it stays fp16."""
    if weights == "fp16" or (weights == "auto" and not quantized.available()):
        return None
    exact = weights == "auto"
    packed = []
    for layer in matrices:
        groups = {name: quantized.int4_groups(w, exact=exact) for name, w in layer.items()}
        if any(g is None for g in groups.values()):
            if weights == "int4":
                raise ValueError("int4 weights need matrices of 16 rows at a time and rows of 32 weights at a time")
            return None
        packed.append(groups)
    return packed


def _tiles(w: Matrix) -> Matrix:
    """(N, K) -> (N/t, K, t) with t = 32 where N allows: each block of 32 output rows stored column by column.

    The compiled product then reads one 64-byte cache line (32 fp16 weights, one per output) for each input
    element and keeps the 32 sums in vector registers; fused with the normalization or activation that feeds
    it, that was faster than the same loop over (N, K) rows, which reduces each row on its own.
    Int4 groups stay in the int4 kernel's own layout."""
    if not isinstance(w, torch.Tensor):
        return w
    n, k = w.shape
    t = math.gcd(n, 32)
    return w.view(n // t, t, k).transpose(1, 2).contiguous()


def _matvec(x: torch.Tensor, w: Matrix) -> torch.Tensor:
    """(K,) fp32 times fp16 weights -> (N,) fp32: w is (N/t, K, t) tiles when compiled, (N, K) rows when eager;
    or 4-bit groups, through torch's int4 kernel either way (quantized.matvec).

    Compiled, the product and the sum fuse into one C++ loop that loads fp16 and multiplies in fp32 (never
    making an fp32 copy of w). Eager, that expression would make one, so PyTorch's fp16 kernel does it."""
    if isinstance(w, Int4Weight):
        return quantized.matvec(x, w)
    if isinstance(w, Int8Rows):
        return quantized.matvec_int8(x, w)
    if torch.compiler.is_compiling():
        return (w.float() * x[:, None]).sum(1).view(-1)  # (N/t, K, t) * (K, 1), summed over K -> (N/t, t) -> (N,)
    return F.linear(x.to(w.dtype), w).float()


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(KV, H/KV, hd) queries attend over (S, KV, hd) keys and values -> (KV, H/KV, hd). No mask: for the newest
    token every cached position is in the past.

    Compiled, the formula itself fuses into a few loops, faster than calling PyTorch's fused kernel from the
    compiled layer; eager, it would materialize (KV, H/KV, S, hd) products, so that kernel is used."""
    if torch.compiler.is_compiling():
        k, v = k.transpose(0, 1)[:, None], v.transpose(0, 1)[:, None]  # (KV, 1, S, hd)
        scores = (q[:, :, None] * k).sum(-1) * q.shape[-1] ** -0.5  # (KV, H/KV, S): dot products, scaled
        return (torch.softmax(scores, -1)[..., None] * v).sum(-2)  # weighted sum of values: (KV, H/KV, hd)
    k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, KV, S, hd)
    return F.scaled_dot_product_attention(q[None], k, v)[0]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _layer(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           w: LayerWeights, heads: int, eps: float) -> torch.Tensor:
    """One decoder layer for one token. x (D,) -> (D,); k, v (S, KV, hd): the cache up to this position,
    whose last slot this token fills."""
    kv_heads, hd = k.shape[1], k.shape[2]
    qkv = _matvec(_rms_norm(x, w.attn_norm, eps), w.qkv).view(heads + 2 * kv_heads, hd)  # (H + 2 KV, hd)
    qk = qkv[: heads + kv_heads]
    qk = qk * cos + qk.roll(hd // 2, -1) * sin  # RoPE on the H query and KV key heads at once
    k[-1] = qk[heads:]  # (KV, hd) into the cache
    v[-1] = qkv[heads + kv_heads:]
    q = qk[:heads].view(kv_heads, heads // kv_heads, hd)  # (KV, H/KV, hd): query heads under their kv head
    x = x + _matvec(_attention(q, k, v).reshape(-1), w.o)  # (D,)
    gate, up = _matvec(_rms_norm(x, w.mlp_norm, eps), w.gate_up).chunk(2)  # (F,) each
    return x + _matvec(F.silu(gate) * up, w.down)  # (D,)


def _final(x: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor, eps: float) -> torch.Tensor:
    return _matvec(_rms_norm(x, norm, eps), lm_head)  # (D,) -> (V,)
