"""dlnotes.beam: a decoder that loops is stopped by the length bound and broken by n-gram blocking; the
length penalty decides between a short and a long hypothesis; greedy is the beam of one."""

from __future__ import annotations

import pytest
import torch

from dlnotes.beam import beam_search, block_repeated_ngrams, max_lengths

BOS, EOS, PAD = 0, 1, 2
CYCLE = [3, 4, 5]  # the looping model's favourite: 3 4 5 3 4 5 ...
VOCAB = 8


def looping_step(words: torch.Tensor, state: torch.Tensor):
    """A fake decoder that always prefers to continue the cycle 3 -> 4 -> 5 -> 3; <eos> is its least likely
    word but one, and 6, 7 come in between: what a model stuck in "como tu prójimo como ti ..." looks like."""
    last = words[:, -1]
    logits = torch.full((len(words), VOCAB), -4.0)
    logits[:, EOS] = -3.0
    logits[:, 6], logits[:, 7] = -1.0, -2.0
    logits[:, PAD] = -50.0
    following = torch.tensor([CYCLE[0]] * VOCAB)
    following[CYCLE[0]], following[CYCLE[1]], following[CYCLE[2]] = CYCLE[1], CYCLE[2], CYCLE[0]
    logits[torch.arange(len(words)), following[last]] = 2.0
    return logits, state, None


def output(ids: torch.Tensor) -> list[list[int]]:
    """Each row's words up to and including <eos>."""
    rows = []
    for row in ids.tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


def ngrams(words: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


@pytest.mark.parametrize("beam", [1, 4])
def test_a_looping_model_runs_to_the_length_bound_without_blocking(beam: int) -> None:
    ids, _ = beam_search(looping_step, torch.zeros(2 * beam, 1), batch=2, beam=beam, max_steps=12, bos=BOS,
                         eos=EOS, pad=PAD)
    for words in output(ids):
        assert len(words) == 12 and words[-1] == EOS  # cut at the bound, which only lets <eos> through
        assert words[:9] == [3, 4, 5] * 3  # the loop


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_breaks_the_loop(beam: int, n: int) -> None:
    ids, _ = beam_search(looping_step, torch.zeros(beam, 1), batch=1, beam=beam, max_steps=30, bos=BOS, eos=EOS,
                         pad=PAD, no_repeat_ngram=n)
    [words] = output(ids)
    assert words[-1] == EOS
    assert len(set(ngrams(words, n))) == len(ngrams(words, n)), words  # no n-gram written twice
    assert len(words) < 30  # it ended by itself, not at the bound


def test_the_length_bound_follows_the_source_length() -> None:
    bounds = max_lengths(torch.tensor([2, 5, 10]), a=1.5, b=2)
    assert bounds.tolist() == [5, 9, 17]
    ids, _ = beam_search(looping_step, torch.zeros(3 * 2, 1), batch=3, beam=2, max_steps=bounds, bos=BOS, eos=EOS,
                         pad=PAD)
    assert [len(w) for w in output(ids)] == [5, 9, 17]
    assert (ids[0, 5:] == PAD).all() and (ids[1, 9:] == PAD).all()  # the short ones only pad after <eos>


def test_length_penalty_decides_between_a_short_and_a_long_hypothesis() -> None:
    """"3 <eos>" has log-probability log 0.5 = -0.69 in 2 words; "4 5 6 <eos>" has log 0.4 = -0.92 in 4 words.
    The plain sum (penalty 0) prefers the short one; per word (penalty 1) -0.35 < -0.23 prefers the long one."""
    probs = torch.full((VOCAB, VOCAB), 1e-12)
    probs[BOS, 3], probs[BOS, 4], probs[BOS, 7] = 0.5, 0.4, 0.1
    probs[3, EOS] = probs[4, 5] = probs[5, 6] = probs[6, EOS] = probs[7, EOS] = 1.0
    table = probs.log()

    def step(words: torch.Tensor, state: torch.Tensor):
        return table[words[:, -1]], state, None

    def best(penalty: float) -> list[int]:
        ids, _ = beam_search(step, torch.zeros(3, 1), batch=1, beam=3, max_steps=6, bos=BOS, eos=EOS, pad=PAD,
                             length_penalty=penalty)
        return output(ids)[0]

    assert best(0.0) == [3, EOS]
    assert best(1.0) == [4, 5, 6, EOS]


def test_block_repeated_ngrams_bans_exactly_the_words_that_followed_before() -> None:
    hypotheses = torch.tensor([[3, 4, 5, 3, 4], [3, 4, 5, 6, 7]])
    logp = torch.zeros(2, VOCAB)

    def banned(n: int) -> list[list[int]]:
        return [torch.isinf(row).nonzero().flatten().tolist() for row in block_repeated_ngrams(logp, hypotheses, n)]

    assert banned(3) == [[5], []]  # "3 4" was followed by 5 before; "6 7" never came before
    assert banned(2) == [[5], []]  # "4" was followed by 5
    assert banned(1) == [[3, 4, 5], [3, 4, 5, 6, 7]]  # n = 1: no word twice
    assert banned(0) == [[], []] and banned(6) == [[], []]  # off, and longer than the hypotheses
    assert not torch.isinf(logp).any()  # the input is left alone
