"""Weights kept in the 4 bits their GGUF file gave them: int4 groups, and the matrix-vector product that reads them.

A GGUF file stores SmolLM2's layer matrices as Q4_1: every 32 consecutive weights of a row share a scale d
and a minimum m, and each weight is a 4-bit q in 0..15, worth m + q * d. Loading converts them to fp32 (the
model transformers runs, our reference); the decoding step can read them in those 4 bits instead:

    w (N, K) fp32 --int4_groups--> packed (N, K/2) uint8 + scales_zeros (K/32, N, 2)   an eighth of the bytes
    x (K,) fp32 --matvec--> (N,) fp32                                                   torch's int4 CPU kernel

Since the weights were 4-bit groups already, nothing is rounded that the file had not rounded: `int4_groups`
refuses a matrix that is not exactly such groups (a model that came as fp16 or fp32 keeps fp16). What does
round is the kernel's arithmetic: its input and the scales are bf16 (8 bits of mantissa), its sums fp32, so
logits move by a few parts in a thousand. scripts/bench_llm.py --quality checks what that does to held-out
perplexity and to greedy replies.

Generating a token reads every weight once to do 2 flops with it, so bytes read set the speed: fp16 reads
2 bytes a weight, these groups 0.5 plus 4 bytes of scales per 32 weights. The kernel has AVX2 and AVX-512
code (bf16 is converted by shifting, no native bf16 needed), chosen by torch at run time.

The output matrix came as Q8_0 (8 bits, a scale per 32) and 4 bits cost it too much perplexity, so it gets
int8 with one scale per row instead, read by torch's weight-only int8 kernel (bf16 in and out):

    w (N, K) fp32 --int8_rows--> q (N, K) int8 + scales (N,) bf16                    a quarter of the bytes
    x (K,) fp32 --matvec_int8--> (N,) fp32                                          rounded anew: not exact
"""

from __future__ import annotations

from typing import NamedTuple

import torch

GROUP = 32  # Q4_1's block: 32 weights of a row share a scale and a minimum


class Int8Rows(NamedTuple):
    """An (N, K) matrix as int8 with one scale per row: weight[n, k] = q[n, k] * scale[n]."""
    q: torch.Tensor  # (N, K) int8 in -127..127
    scales: torch.Tensor  # (N,) bf16, the kernel's type for them


class Int4Weight(NamedTuple):
    """An (N, K) matrix as 4-bit groups of 32 along K, in the layout of torch's int4 CPU kernel."""
    packed: torch.Tensor  # (N, K/2) uint8: two 4-bit q per byte
    scales_zeros: torch.Tensor  # (K/32, N, 2) bf16: per group, d and the value of q = 8 (weight = (q - 8) d + zero)


def available() -> bool:
    """torch has the int4 CPU kernel (2.6 and later) and this CPU has the vector units it is written for."""
    ops = torch.ops.aten
    return (hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def int4_groups(w: torch.Tensor, exact: bool = True) -> Int4Weight | None:
    """(N, K) weights -> Int4Weight; None where the kernel cannot take the shape, or, with `exact`, where the
    weights are not already 4-bit groups (quantizing them would change the model). The groups, d and m come
    from the dequantized fp32 weights (q4_1_groups)."""
    n, k = w.shape
    if n % 16 or k % GROUP:  # the kernel's packing works on 16 rows at a time
        return None
    q, scale, low, is_groups = q4_1_groups(w)
    if exact and not is_groups:
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, k).to(torch.int32), 1)
    zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
    scales_zeros = torch.cat([scale, zero], -1).transpose(0, 1).contiguous()  # (K/32, N, 2)
    return Int4Weight(packed, scales_zeros.to(torch.bfloat16))


def q4_1_groups(w: torch.Tensor, scales: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """(N, K) weights -> their Q4_1 groups: q (N, K/32, 32) in 0..15 (as floats), the scale d and the minimum m
    (N, K/32, 1), held to `scales`' precision, and whether the weights are exactly these groups (no weight more
    than a thousandth of a step off its group's grid). Q4_1 gives each group's smallest weight q = 0 and its
    largest q = 15, so min and max recover d and m, and every q."""
    n, k = w.shape
    groups = w.detach().float().reshape(n, k // GROUP, GROUP)  # (N, K/32, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)  # (N, K/32, 1) each
    scale, low = ((high - low) / 15).to(scales).float(), low.to(scales).float()
    q = torch.where(scale > 0, (groups - low) / scale.clamp(min=1e-30), 0).round().clamp(0, 15)
    exact = not ((q * scale + low - groups).abs() > 1e-3 * scale + 1e-6 * groups.abs()).any()
    return q, scale, low, exact


def int8_rows(w: torch.Tensor) -> Int8Rows:
    """(N, K) weights -> Int8Rows: each row scaled so its largest weight is 127, then rounded (absmax)."""
    w = w.detach().float()
    scale = w.abs().amax(1).clamp(min=1e-30) / 127  # (N,)
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)  # (N, K)
    return Int8Rows(q, scale.to(torch.bfloat16))


def matvec_int8(x: torch.Tensor, w: Int8Rows) -> torch.Tensor:
    """(K,) fp32 -> (N,) fp32 through torch's weight-only int8 kernel: x rounded to bf16, sums in fp32, the
    result returned as bf16 (logits keep 8 bits of mantissa: a few hundredths at the top logits)."""
    return torch.ops.aten._weight_int8pack_mm(x[None].to(torch.bfloat16), w.q, w.scales)[0].float()


def dequantize(w: Int4Weight) -> torch.Tensor:
    """The (N, K) fp32 weights the kernel multiplies by (with its bf16 scales): for tests and checks."""
    k = w.packed.shape[1] * 2
    eye = torch.eye(k, dtype=torch.bfloat16)  # the kernel times the identity: its own view of the weights
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, w.packed, GROUP, w.scales_zeros).float().t()


def matvec(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """(K,) fp32 -> (N,) fp32: x rounded to bf16, sums in fp32 inside the kernel."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x[None].to(torch.bfloat16), w.packed, GROUP,
                                                      w.scales_zeros)[0].float()
