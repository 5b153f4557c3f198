"""The speed switches every training recipe shares: `--precision` and `--compile`.

Mixed precision runs the matrix multiplies and convolutions in a 16-bit format under `torch.autocast`,
while the weights, the optimizer and the reductions stay fp32:

    fp32   the reference, and the CPU default for most recipes
    bf16   same exponent range as fp32, so no loss scaling; tensor cores on Ampere+ GPUs: the CUDA default.
           On a CPU with native bf16 (avx512_bf16 or AMX) convolutions gain too, so it is cnn-mnist's CPU
           default there; the 50k-weight MLP loses (casting costs more than its tiny multiplies save).
    fp16   needs a GradScaler (small gradients underflow in fp16); CUDA only (GPUs before Ampere have no bf16)

`--compile` hands the model to `torch.compile`: its forward and backward become fused kernels (C++ on CPU,
Triton on CUDA). It pays off on GPUs, for long runs of a fixed shape; the first steps wait for the compiler.
On a few CPU cores it makes both small models slower (the compiled kernels save less than the extra
overhead costs), so it stays off by default. The README has the measured numbers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from typing import Any

from dlnotes.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(name: str, device: Any, bf16_on_cpu: bool = False) -> str:
    """`auto` becomes the fastest correct choice for `device`; a choice the device cannot run is a UserError.
    `bf16_on_cpu`: the recipe measured bf16 faster on CPUs with native bf16 support."""
    import torch

    if name not in PRECISIONS:
        raise UserError(f"Unknown precision '{name}': use one of {', '.join(PRECISIONS)}.")
    cuda = device.type == "cuda"
    if name == "auto":
        if not cuda:
            native = device.type == "cpu" and torch.backends.mkldnn.is_available() and cpu_has_bf16()
            return "bf16" if bf16_on_cpu and native else "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp16" and not cuda:
        raise UserError(f"--precision fp16 needs a CUDA GPU (device here: {device.type}); "
                        "use --precision bf16 or fp32.")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16 is not supported by this GPU; use --precision fp16.")
    return name


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")  # what decides kernels and precision


def cpu_features() -> dict[str, Any]:
    """What this CPU offers the kernels: its vector-instruction flags of VECTOR_FLAGS (Linux, /proc/cpuinfo), the
    instruction set torch's own kernels use here (`AVX2`, `AVX512`; ATEN_CPU_CAPABILITY can lower it) and whether
    oneDNN computes bf16 natively (ONEDNN_MAX_CPU_ISA=AVX2 turns that off, which emulates an AVX2-only CPU's
    choices on a newer one). Bench tables carry it: the same recipe picks other paths on other CPUs."""
    import platform
    from pathlib import Path

    import torch

    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        line = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
        flags = set(line.partition(":")[2].split())
    return {"flags": [f for f in VECTOR_FLAGS if f in flags], "torch_kernels": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_bf16() if torch.backends.mkldnn.is_available() else False,
            "arch": platform.machine()}


def cpu_has_bf16() -> bool:
    """The CPU computes in bf16 natively (avx512_bf16 or AMX), not by emulating it in fp32."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: Any, precision: str) -> Any:
    """The context a forward pass runs in: autocast to bf16/fp16, or nothing for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device: Any, precision: str) -> Any:
    """A GradScaler that is active only for fp16 (scale the loss up so small gradients do not flush to zero);
    disabled, its scale/step/update calls are plain loss.backward() and optimizer.step()."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def compile_model(model: Any, enabled: bool, device: Any) -> Any:
    """`torch.compile(model)` when `enabled`; a clear error when this machine cannot compile."""
    if not enabled:
        return model
    import torch

    check_compiler(device)
    return torch.compile(model)


def check_compiler(device: Any) -> None:
    """torch.compile's backend for `device` can run here, or a UserError saying what is missing."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError("--compile on CUDA needs Triton (pip install triton); run without --compile.")
    if device.type == "cpu":
        from torch._inductor import config

        compiler = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
        if not any(shutil.which(c) for c in ([compiler] if compiler else ["g++", "c++", "clang++"])):
            raise UserError("--compile on CPU needs a C++ compiler (g++ or clang++ on PATH); run without --compile.")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--compile is not supported on {device.type} here; run without --compile.")
