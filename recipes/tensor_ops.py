"""Tensor operations: a guided walk through the shapes every model in this cookbook pushes around.

Deep-learning code is mostly bookkeeping of tensor shapes. PyTorch puts the batch first: a batch of B
sequences of T tokens with D features each is (B, T, D). Each step below prints its input and output
shapes with one line of why, and asserts them, so a wrong line fails loudly instead of broadcasting
silently into nonsense.

    cat           (B, T, D) + (B, T, E)        -> (B, T, D+E)     join features along the last dim
    matmul / @    (B, T, D) @ (D, H)           -> (B, T, H)       batch dims ride along
    view/reshape  (B, T, D)                    -> (B, T*D)        row-major: the last dim varies fastest
    unsqueeze     (B, D)                       -> (B, 1, D)       make room to broadcast
    expand        (B, 1, D)                    -> (B, T, D)       no copy; repeat copies
    transpose     (B, T, D)                    -> (B, D, T)       permute generalises it
    broadcasting  (B, T, D) + (D,)             -> (B, T, D)       shapes align from the right
    argmax        (B, C) logits                -> (B,)            softmax is monotonic: not needed
    sum / mean    (B, T, D) over dim=1         -> (B, D)          the reduced dim disappears
    attention     Q (B, T, D), K, V (B, S, D)  -> (B, T, D)       softmax(Q Kᵀ / √D + mask) V

The last step builds scaled dot-product attention by hand, with a causal mask, and checks it against
`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlnotes.device import pick_device, seed_everything
from dlnotes.flags import require_positive
from dlnotes.launch import cli

TAGS = ("basics", "tensors")
DATASET = "random tensors"
SMOKE = {"batch": 2, "seq_len": 3, "features": 4}
TRAINS = False  # checks shapes, trains nothing: no --resume/--save-every/--keep


@dataclass
class Config:
    batch: int = 4  # B
    seq_len: int = 5  # T
    features: int = 8  # D
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive(self, "batch", "seq_len", "features")


def step(name: str, why: str, inputs: list[torch.Tensor], output: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Print one step and check its output shape."""
    shapes = " + ".join(str(tuple(t.shape)) for t in inputs)
    print(f"{name:<14} {shapes:<34} -> {str(tuple(output.shape)):<14} {why}")
    assert tuple(output.shape) == expected, f"{name}: expected {expected}, got {tuple(output.shape)}"


def main(cfg: Config) -> dict[str, float]:
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    B, T, D = cfg.batch, cfg.seq_len, cfg.features
    x = torch.randn(B, T, D, device=device)  # (B, T, D): batch first
    checks = 0

    # --- joining and multiplying ----------------------------------------------------------------------
    extra = torch.randn(B, T, 2, device=device)
    joined = torch.cat([x, extra], dim=-1)  # (B, T, D + 2)
    step("cat", "features side by side: every other dim must match", [x, extra], joined, (B, T, D + 2))
    assert torch.equal(joined[..., :D], x)
    checks += 1

    weight = torch.randn(D, 3, device=device)
    projected = x @ weight  # (B, T, 3): the same weight applied at every (b, t)
    step("matmul", "a linear layer without bias: batch dims ride along", [x, weight], projected, (B, T, 3))
    assert torch.allclose(projected[1, 2], x[1, 2] @ weight, atol=1e-5)
    checks += 1

    # --- changing the shape without changing the data --------------------------------------------------
    flat = x.reshape(B, T * D)  # (B, T*D); view works too because x is contiguous
    step("reshape", "row-major: x[b, t, d] lands at flat[b, t*D + d]", [x], flat, (B, T * D))
    assert torch.equal(flat[0, 1 * D + 2], x[0, 1, 2])
    checks += 1

    row = x[:, 0, :]  # (B, D)
    lifted = row.unsqueeze(1)  # (B, 1, D)
    step("unsqueeze", "a size-1 dim to broadcast against T", [row], lifted, (B, 1, D))
    assert torch.equal(lifted.squeeze(1), row)
    checks += 1

    expanded = lifted.expand(B, T, D)  # (B, T, D), a view: stride 0 along T, no memory
    repeated = lifted.repeat(1, T, 1)  # (B, T, D), a real copy
    step("expand", "a view with stride 0; repeat makes a copy", [lifted], expanded, (B, T, D))
    assert torch.equal(expanded, repeated) and expanded.stride(1) == 0
    checks += 1

    swapped = x.transpose(1, 2)  # (B, D, T): what Conv1d wants
    permuted = x.permute(2, 0, 1)  # (D, B, T): any order
    step("transpose", "swap two dims; permute reorders all", [x], swapped, (B, D, T))
    assert torch.equal(swapped[0, 3, 1], x[0, 1, 3]) and permuted.shape == (D, B, T)
    assert not swapped.is_contiguous()  # .view would fail now; .reshape copies when it must
    checks += 1

    # --- broadcasting and reductions -------------------------------------------------------------------
    bias = torch.randn(D, device=device)
    shifted = x + bias  # (B, T, D) + (D,): shapes align from the right
    step("broadcast", "(D,) is stretched over B and T", [x, bias], shifted, (B, T, D))
    assert torch.allclose(shifted[2 % B, 1 % T], x[2 % B, 1 % T] + bias)
    checks += 1

    logits = torch.randn(B, 10, device=device)
    predicted = logits.argmax(dim=1)  # (B,)
    step("argmax", "softmax keeps the order: argmax of logits suffices", [logits], predicted, (B,))
    assert torch.equal(predicted, logits.softmax(dim=1).argmax(dim=1))
    checks += 1

    totals = x.sum(dim=1)  # (B, D)
    means = x.mean(dim=1, keepdim=True)  # (B, 1, D): keepdim keeps it broadcastable
    step("sum", "the reduced dim disappears (keepdim=True keeps it as 1)", [x], totals, (B, D))
    assert torch.allclose(means.squeeze(1) * T, totals, atol=1e-5)
    checks += 1

    # --- attention by hand, checked against PyTorch's fused kernel -------------------------------------
    queries, keys, values = x, torch.randn(B, T, D, device=device), torch.randn(B, T, D, device=device)
    scores = queries @ keys.transpose(1, 2) / math.sqrt(D)  # (B, T, T): every query against every key
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T): position t sees <= t
    scores = scores.masked_fill(~causal, float("-inf"))  # -inf becomes weight 0 after softmax
    weights = scores.softmax(dim=-1)  # (B, T, T), each row sums to 1
    attended = weights @ values  # (B, T, D)
    step("attention", "softmax(Q Kᵀ/√D + mask) V, checked against SDPA", [queries, keys, values], attended,
         (B, T, D))
    reference = F.scaled_dot_product_attention(queries, keys, values, is_causal=True)
    max_error = (attended - reference).abs().max().item()
    assert max_error < 1e-4, f"hand-written attention differs from SDPA by {max_error}"
    assert torch.allclose(weights.sum(-1), torch.ones(B, T, device=device), atol=1e-5)
    checks += 1

    print(f"\nall {checks} steps checked on {device}; attention max |error| vs SDPA = {max_error:.2e}")
    return {"steps_checked": float(checks), "attention_max_error": max_error}


if __name__ == "__main__":
    cli(Config, main)
