"""Greedy and beam search for any decoder that generates one token at a time (the seq2seq recipe's LSTM, the
transformer-mt recipe's decoder), with the three guards real translation systems use (fairseq, Hugging Face
`generate`):

    length bound        each sentence stops at max_len = a * source length + b tokens (`max_lengths`); the
                        last allowed step can only say `eos`, so a cut-off hypothesis pays for its ending
    length penalty      the winner has the best score / length ** alpha: alpha 0 is the plain sum of
                        log-probabilities (favours short outputs), 1 the mean per word
    no-repeat n-grams   an n-gram already in a hypothesis cannot be written again (`no_repeat_ngram` = n;
                        0 = off): a decoder stuck in "como tu prójimo como ti tu prójimo como ti ..." must
                        leave the loop or end the sentence

The caller hands over a `step` function and the decoder's state, laid out as B sentences x K beams, rows
sentence-major (row b*K + k is beam k of sentence b):

    step(words (B*K, 1), state) -> logits (B*K, V), new state, trace (B*K, ...) or None

`trace` is anything per generated word the caller wants back along the winning hypothesis (seq2seq: the
attention row, for copying names and for the plot). Each step every beam proposes its V continuations, the
K best of each sentence's K*V survive, and the state rows follow their parent beams. A finished beam (it
said `eos`) only extends with `pad` at no cost. Greedy decoding is the beam of one.
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


def max_lengths(source_lengths: torch.Tensor, a: float, b: int) -> torch.Tensor:
    """The length bound of each output (B,), from its source's length (B,): a * source + b tokens, `eos`
    included, at least 1."""
    return (a * source_lengths.float() + b).long().clamp(min=1)


def block_repeated_ngrams(logp: torch.Tensor, hypotheses: torch.Tensor, n: int) -> torch.Tensor:
    """`logp` (N, V) with -inf on every word that would complete an n-gram already in its row of
    `hypotheses` (N, L): the words that followed earlier occurrences of the row's last n-1 words."""
    N, L = hypotheses.shape
    if n <= 0 or L < n:
        return logp
    windows = hypotheses.unfold(1, n, 1)  # (N, L-n+1, n): every n-gram so far
    last = hypotheses[:, L - n + 1 :]  # (N, n-1): the words the next one would follow (none for n = 1)
    seen = (windows[:, :, : n - 1] == last[:, None, :]).all(dim=2)  # (N, L-n+1): same n-1 words before
    rows, at = seen.nonzero(as_tuple=True)
    logp = logp.clone()
    logp[rows, windows[rows, at, n - 1]] = float("-inf")
    return logp


@torch.no_grad()
def beam_search(step: Step, state: Any, batch: int, beam: int, max_steps: int | torch.Tensor, bos: int, eos: int,
                pad: int, state_dim: int = 0, length_penalty: float = 1.0,
                no_repeat_ngram: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The best of `beam` hypotheses for each of `batch` sentences. `state` holds B*K rows along `state_dim`
    (an LSTM's (layers, B*K, H) state: 1). `max_steps` bounds every output's length, `eos` included: one
    number, or one per sentence (B,) from `max_lengths`. Returns ids (B, T), without the leading `bos`, and
    the step's traces along the winners (B, T, ...), or None when the step returns none."""
    B, K = batch, beam
    device = _device_of(state)
    limit = torch.as_tensor(max_steps, device=device).expand(B).repeat_interleave(K)  # (B*K,)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all K beams start identical: only the first may expand, or we'd keep K copies
    words = torch.full((B * K, 1), bos, device=device)  # (B*K, 1 + steps)
    traces: torch.Tensor | None = None  # (B*K, steps, ...)
    done = torch.zeros(B * K, dtype=torch.bool, device=device)
    for t in range(int(limit.max())):
        logits, state, trace = step(words[:, -1:], state)  # (B*K, V)
        logp = logits.float().log_softmax(dim=-1)  # (B*K, V)
        logp = block_repeated_ngrams(logp, words[:, 1:], no_repeat_ngram)
        last = limit == t + 1  # (B*K,) this sentence's last allowed word: it must end here
        logp[last] = torch.where(torch.arange(logp.size(1), device=device) == eos, logp[last], float("-inf"))
        logp[done] = float("-inf")
        logp[done, pad] = 0.0  # a finished beam only extends with <pad>, at no cost
        vocab = logp.size(1)
        total = (scores.view(-1, 1) + logp).view(B, K * vocab)  # (B, K*V): every continuation of every beam
        scores, flat = total.topk(K, dim=1)  # (B, K)
        rows = (torch.arange(B, device=device)[:, None] * K + flat // vocab).view(-1)  # (B*K,) parent beams
        word = (flat % vocab).view(-1, 1)  # (B*K, 1)
        words = torch.cat([words[rows], word], dim=1)
        if trace is not None:
            past = traces[rows] if traces is not None else trace.new_zeros((B * K, 0, *trace.shape[1:]))
            traces = torch.cat([past, trace[rows, None]], dim=1)
        state = select_rows(state, rows, state_dim)
        done = done[rows] | (word[:, 0] == eos)
        if done.all():
            break
    length = (words[:, 1:] != pad).sum(dim=1).clamp(min=1).view(B, K)  # words + eos
    best = (scores / length.float() ** length_penalty).argmax(dim=1)  # (B,)
    rows = torch.arange(B, device=device) * K + best
    return words[rows, 1:], traces[rows] if traces is not None else None


def _device_of(state: Any) -> torch.device:
    return state.device if isinstance(state, torch.Tensor) else _device_of(state[0])
