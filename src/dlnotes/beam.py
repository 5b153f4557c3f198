"""Beam search for any decoder that generates one token at a time: the seq2seq recipe's LSTM today, a
transformer's cached decoder tomorrow.

The caller hands over a `step` function and the decoder's state, laid out as B sentences x K beams, rows
sentence-major (row b*K + k is beam k of sentence b):

    step(words (B*K, 1), state) -> logits (B*K, V), new state, trace (B*K,) or None

`trace` is anything per generated word the caller wants back along the winning hypothesis (seq2seq: the
source position the decoder attended to most, for copying names). Each step every beam proposes its V
continuations, the K best of each sentence's K*V survive, and the state rows follow their parent beams.
A finished beam (it said `eos`) only extends with `pad` at no cost. The winner of each sentence is the
beam with the best log-probability per word: a plain sum favours short outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Step = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any, "torch.Tensor | None"]]


def select_rows(state: Any, rows: torch.Tensor, dim: int = 0) -> Any:
    """`state` (a tensor, or tuples/lists of them) with its batch dimension `dim` indexed by `rows`."""
    if isinstance(state, torch.Tensor):
        return state.index_select(dim, rows)
    return type(state)(select_rows(s, rows, dim) for s in state)


@torch.no_grad()
def beam_search(step: Step, state: Any, batch: int, beam: int, max_steps: int, bos: int, eos: int, pad: int,
                state_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The best of `beam` hypotheses for each of `batch` sentences. `state` holds B*K rows along `state_dim`
    (an LSTM's (layers, B*K, H) state: 1). Returns ids (B, T), without the leading `bos`, and the step's
    traces along the winners (B, T), or None when the step returns none."""
    B, K = batch, beam
    device = _device_of(state)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all K beams start identical: only the first may expand, or we'd keep K copies
    words = torch.full((B * K, 1), bos, device=device)  # (B*K, 1 + steps)
    traces: torch.Tensor | None = None  # (B*K, steps)
    done = torch.zeros(B * K, dtype=torch.bool, device=device)
    for _ in range(max_steps):
        logits, state, trace = step(words[:, -1:], state)  # (B*K, V)
        logp = logits.float().log_softmax(dim=-1)  # (B*K, V)
        logp[done] = float("-inf")
        logp[done, pad] = 0.0  # a finished beam only extends with <pad>, at no cost
        vocab = logp.size(1)
        total = (scores.view(-1, 1) + logp).view(B, K * vocab)  # (B, K*V): every continuation of every beam
        scores, flat = total.topk(K, dim=1)  # (B, K)
        rows = (torch.arange(B, device=device)[:, None] * K + flat // vocab).view(-1)  # (B*K,) parent beams
        word = (flat % vocab).view(-1, 1)  # (B*K, 1)
        words = torch.cat([words[rows], word], dim=1)
        if trace is not None:
            past = traces[rows] if traces is not None else trace.new_zeros((B * K, 0))
            traces = torch.cat([past, trace[rows, None]], dim=1)
        state = select_rows(state, rows, state_dim)
        done = done[rows] | (word[:, 0] == eos)
        if done.all():
            break
    length = (words[:, 1:] != pad).sum(dim=1).clamp(min=1).view(B, K)
    best = (scores / length).argmax(dim=1)  # (B,) log-probability per word: long outputs are not penalised
    rows = torch.arange(B, device=device) * K + best
    return words[rows, 1:], traces[rows] if traces is not None else None


def _device_of(state: Any) -> torch.device:
    return state.device if isinstance(state, torch.Tensor) else _device_of(state[0])
