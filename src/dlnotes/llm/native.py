"""A llama's whole decoding step in C (llama_step.c), built on first use with the system's C compiler.

Why C, when the rest of the cookbook is PyTorch: on a CPU with AVX2 but no AVX-512, our torch step (torch's int4
kernel for the 4-bit layers, torch.compile'd code between them, ~150 calls into PyTorch a token) reached only
0.42-0.47x llama.cpp's speed: torch's AVX2 int4 kernel is about half as fast as its AVX-512 one, and each call
of a compiled layer pays for guards and wrappers. This step does a whole token in one call (norms, products,
RoPE, attention, the output matrix), on the weights as the GGUF file stores them:

    layer matrices   Q4_1 blocks: 32 weights of a row share d and m (fp16), w = d q + m, q in 0..15
    output matrix    Q8_0 blocks: 32 weights of a row share d (fp16), w = d q, q in -127..127
    activations      fp32, and so are all sums: nothing is rounded that the file had not rounded

Each weight becomes a float in a register and meets the activations in 8-wide fused multiply-adds. Only AVX2,
FMA and F16C are used, so both kinds of x86 CPU run the same code; measured, it was faster than the torch step
on both (README, serve section). Rounding the activations to 8 bits as llama.cpp does, for integer products,
was no faster here and cost perplexity (+0.4 %), so they stay fp32.

The blocks are recovered exactly from the fp32 copy transformers loaded (a block's min and max give d and m,
as quantized.int4_groups does); layer matrices that are not such blocks are refused (`None`: the torch step
serves that model), an output matrix that is not is rounded to Q8_0. The KV cache is the decoder's own tensor,
(layers, 2, max_len, KV, hd), filled by transformers' prefill. A ctypes call lets go of Python's GIL, so the HTTP
server and its client run while a token is computed. Rows of each product are split between `threads` OpenMP
threads (the same libgomp as torch's). Built into `cache_dir()/native/` once per source version; needs x86-64
with AVX2, FMA and F16C (read from /proc/cpuinfo, not assumed) and a C compiler with OpenMP (`$CC`, else cc)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from dlnotes.llm import quantized

SOURCE = Path(__file__).with_name("llama_step.c")
FLAGS = ("avx2", "fma", "f16c")  # the instructions llama_step.c is compiled for
BLOCK = quantized.GROUP  # 32 weights of a row per block, in every GGUF format used here


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unavailable() -> str:
    """Why the C step cannot run here, or "" when it can (before building it)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the C step is written for x86-64 (this is {platform.machine()})"
    missing = [f for f in FLAGS if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if not shutil.which(os.environ.get("CC", "cc")):
        return "no C compiler (cc, or $CC)"
    return ""


def library() -> ctypes.CDLL:
    """llama_step.c compiled (once per source version) and loaded. Raises RuntimeError if it does not build."""
    from dlnotes.llm.models import cache_dir

    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:12]
    folder = cache_dir() / "native"
    path = folder / f"llama_step-{key}.so"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        # built under a temporary name, then renamed: two processes building at once never load half a file
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".so")
        os.close(handle)
        command = [os.environ.get("CC", "cc"), "-O3", *(f"-m{f}" for f in FLAGS), "-fopenmp", "-shared", "-fPIC",
                   str(SOURCE), "-o", temporary, "-lm"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            os.unlink(temporary)
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"{command[0]} failed: {last}")
        os.replace(temporary, path)
    lib = ctypes.CDLL(str(path))  # a CDLL call lets go of the GIL while it runs
    model, floats, number = ctypes.POINTER(_Model), ctypes.POINTER(ctypes.c_float), ctypes.c_int
    lib.llama_step.argtypes = [model, number, number, floats, floats, floats, number, floats, floats]
    lib.llama_step.restype = None
    lib.scratch_floats.argtypes = [model, number]
    lib.scratch_floats.restype = number
    return lib


class _Q41(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p)]


class _Q80(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("d", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in
                ("layers", "dim", "ffn", "heads", "kv_heads", "head_dim", "vocab", "threads")] + [
        ("eps", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("embed", "attn_norm", "mlp_norm", "norm")),
        *((name, _Q41) for name in ("qkv", "o", "gate_up", "down")),
        ("lm_head", _Q80)]


def q4_1(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(N, K) fp32 weights that are Q4_1 blocks -> (nibbles (N, K/2) uint8, d (N, K/32) fp16, m (N, K/32) fp16);
    None if they are not such blocks (more than a thousandth of a step off the block's grid)."""
    n, k = w.shape
    if k % BLOCK:
        return None
    q, d, m, exact = quantized.q4_1_groups(w, scales=torch.float16)  # the file's d and m are fp16
    if not exact:
        return None
    q = q.to(torch.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # byte j: weight j low, weight j + 16 high
    return nibbles.reshape(n, k // 2).contiguous(), d[..., 0].half().contiguous(), m[..., 0].half().contiguous()


def q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(N, K) fp32 -> (q (N, K) int8, d (N, K/32) fp16, exact): exact when the weights were Q8_0 blocks already
    (as SmolLM2's output matrix is); otherwise they are rounded to such blocks."""
    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    d = (blocks.abs().amax(-1) / 127).half()  # the largest weight of a block is q = +-127
    step = d.float()[..., None]
    q = torch.where(step > 0, blocks / step.clamp(min=1e-30), 0).round().clamp(-127, 127)
    exact = bool(((q * step - blocks).abs() <= 1e-3 * step + 1e-6 * blocks.abs()).all())
    return q.to(torch.int8).reshape(n, k).contiguous(), d.contiguous(), exact


class CStep:
    """The C decoding step for one model: `step(token, pos, cos, sin, cache)` -> logits (V,) fp32."""

    def __init__(self, lib: ctypes.CDLL, model: Any, layers: list[dict[str, tuple]], threads: int) -> None:
        cfg = model.config
        self.lib = lib
        self.keep: list[torch.Tensor] = []  # every tensor the C side points into stays alive with this object

        def pointer(t: torch.Tensor) -> int:
            t = t.detach().contiguous()
            self.keep.append(t)
            return t.data_ptr()

        def q41(key: str) -> _Q41:  # every layer's blocks one after the other: (L, ...) per part
            return _Q41(*(pointer(torch.stack([layer[key][part] for layer in layers])) for part in range(3)))

        lm_q, lm_d, _ = q8_0(model.lm_head.weight)
        inner = model.model
        self.model = _Model(
            layers=len(layers), dim=cfg.hidden_size, ffn=cfg.intermediate_size, heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None) or
            cfg.hidden_size // cfg.num_attention_heads, vocab=model.lm_head.weight.shape[0], threads=threads,
            eps=cfg.rms_norm_eps, embed=pointer(inner.embed_tokens.weight.float()),
            attn_norm=pointer(torch.stack([layer.input_layernorm.weight for layer in inner.layers]).float()),
            mlp_norm=pointer(torch.stack([layer.post_attention_layernorm.weight for layer in inner.layers]).float()),
            norm=pointer(inner.norm.weight.float()), qkv=q41("qkv"), o=q41("o"), gate_up=q41("gate_up"),
            down=q41("down"), lm_head=_Q80(pointer(lm_q), pointer(lm_d)))
        self.scratch = torch.empty(0)

    def step(self, token: int, pos: int, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """Token `token` at position `pos` (cos, sin: that position's RoPE rows (hd,)); its keys and values go
        into `cache` (L, 2, max_len, KV, hd) fp32; the logits (V,) for the next token."""
        if cache.dtype != torch.float32 or not cache.is_contiguous() or not 0 <= pos < cache.shape[2]:
            raise ValueError(f"the C step needs a contiguous fp32 cache with room for position {pos}")
        max_len = cache.shape[2]
        if self.scratch.numel() < (need := self.lib.scratch_floats(self.model, max_len)):
            self.scratch = torch.empty(need)
        logits = torch.empty(self.model.vocab)
        self.lib.llama_step(self.model, token, pos, _floats(cos), _floats(sin), _floats(cache), max_len,
                            _floats(logits), _floats(self.scratch))
        return logits


def _floats(t: torch.Tensor) -> Any:
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))


def c_step(model: Any, matrices: list[dict[str, torch.Tensor]], threads: int) -> CStep | None:
    """The C step for `model` whose fused layer matrices (qkv, o, gate_up, down; fp32) are `matrices`; None
    where it cannot run here (`unavailable`), the matrices are not Q4_1, or it does not build (with a warning)."""
    if unavailable():
        return None
    layers = []
    for layer in matrices:
        packed = {name: q4_1(w) for name, w in layer.items()}
        if any(p is None for p in packed.values()):
            return None  # not a Q4_1 file: the torch step serves it
        layers.append(packed)
    try:
        lib = library()
    except (RuntimeError, OSError) as err:
        print(f"warning: the C decoding step did not build ({err}); decoding with torch (slower).", file=sys.stderr)
        return None
    return CStep(lib, model, layers, threads)
