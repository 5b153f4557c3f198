"""seq2seq: packing, parallel teacher forcing, decoding, BLEU, the toy pairs learned exactly, bad inputs."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from typer.testing import CliRunner

from dlnotes import catalog
from dlnotes.cli import app
from dlnotes.errors import UserError
from dlnotes.text import Vocab, corpus_bleu
from dlnotes.tracking import latest_run


@pytest.fixture(scope="module")
def seq2seq():
    return catalog.load_module(catalog.get("seq2seq"))


@pytest.fixture(scope="module")
def toy_run(seq2seq, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path]:
    """The SMOKE run: the notes' toy pairs, a small model, a few seconds."""
    out = tmp_path_factory.mktemp("runs")
    values = catalog.config_values(catalog.get("seq2seq"), smoke=True, device="cpu", out=str(out))
    return seq2seq.main(seq2seq.Config(**values)), latest_run(out, "seq2seq")


def tiny_model(seq2seq, vocab: int = 20) -> torch.nn.Module:
    torch.manual_seed(0)
    return seq2seq.Seq2Seq(vocab, vocab, hidden=16, dropout=0.0).eval()


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock column, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


# --- data and model pieces --------------------------------------------------------------------------------


def test_source_is_lower_cased_and_target_keeps_its_case(seq2seq) -> None:
    assert seq2seq.source_tokens("In the beginning, God created.") == ["in", "the", "beginning", ",", "god",
                                                                        "created", "."]
    assert seq2seq.target_tokens("EN el principio crió Dios.") == ["EN", "el", "principio", "crió", "Dios", "."]


def test_length_batches_cover_every_pair_once_with_similar_lengths(seq2seq) -> None:
    data = [(torch.zeros(n), torch.zeros(1)) for n in [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]]
    batches = seq2seq.length_batches(data, 3, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert all(max(len(data[i][0]) for i in b) - min(len(data[i][0]) for i in b) <= 2 for b in batches)


def test_collate_shifts_the_target_by_one(seq2seq) -> None:
    data = [(torch.tensor([5, 6, 7]), torch.tensor([8, 9])), (torch.tensor([5]), torch.tensor([10, 11, 12]))]
    source, lengths, decoder_in, target = seq2seq.collate(data, [0, 1], torch.device("cpu"))
    bos, eos, pad = seq2seq.BOS_ID, seq2seq.EOS_ID, seq2seq.PAD_ID
    assert source.tolist() == [[5, 6, 7], [5, pad, pad]] and lengths.tolist() == [3, 1]
    assert decoder_in.tolist() == [[bos, 8, 9, pad], [bos, 10, 11, 12]]
    assert target.tolist() == [[8, 9, eos, pad], [10, 11, 12, eos]]


def test_packed_encoder_ignores_padding(seq2seq) -> None:
    model = tiny_model(seq2seq)
    alone, _, (h1, _) = model.encode(torch.tensor([[5, 6]]), torch.tensor([2]))
    padded, mask, (h2, _) = model.encode(torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10]]), torch.tensor([2, 4]))
    assert torch.allclose(alone[0], padded[0, :2], atol=1e-6)  # the backward direction starts at the true end
    assert torch.allclose(h1[:, 0], h2[:, 0], atol=1e-6)
    assert mask.tolist() == [[True, True, False, False], [True] * 4]


def test_teacher_forcing_in_parallel_equals_step_by_step(seq2seq) -> None:
    model = tiny_model(seq2seq)
    memory, mask, state = model.encode(torch.tensor([[5, 6, 7]]), torch.tensor([3]))
    decoder_in = torch.tensor([[seq2seq.BOS_ID, 8, 9, 10]])
    parallel, _, attention = model.decode(decoder_in, state, memory, mask)  # (1, 4, V), (1, 4, 3)
    steps = []
    for t in range(decoder_in.size(1)):
        logits, state, _ = model.decode(decoder_in[:, t : t + 1], state, memory, mask)
        steps.append(logits)
    assert torch.allclose(parallel, torch.cat(steps, dim=1), atol=1e-5)
    assert torch.allclose(attention.sum(-1), torch.ones(1, 4))


def test_beam_of_one_is_greedy(seq2seq) -> None:
    model = tiny_model(seq2seq)
    source, lengths = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([3, 2])
    greedy_ids, _ = seq2seq.greedy(model, source, lengths, max_steps=6)
    beam_ids, _ = seq2seq.beam_decode(model, source, lengths, max_steps=6, beam=1)
    for g, b in zip(greedy_ids.tolist(), beam_ids.tolist()):
        cut = lambda ids: ids[: ids.index(seq2seq.EOS_ID)] if seq2seq.EOS_ID in ids else ids  # noqa: E731
        assert cut(g) == cut(b)


def test_beam_finds_a_better_sentence_than_greedy_and_returns_its_traces() -> None:
    """A step function whose greedy first word leads nowhere: beam search keeps the second-best start alive."""
    from dlnotes.beam import beam_search

    bos, eos, pad = 0, 1, 2
    # next-word logits after each last word: 3 looks best first, but after it nothing is likely (-1.7 per word
    # for <eos>), while 4 leads to 5 <eos> with near certainty
    table = torch.full((6, 6), -9.0)
    table[bos, 3], table[bos, 4] = -0.5, -1.0
    table[3], table[3, eos] = 0.0, 0.1
    table[4, 5], table[5, eos] = 0.0, 0.0

    def step(words: torch.Tensor, state: torch.Tensor):
        return table[words[:, -1]], state + 1, words[:, -1] * 10  # trace: 10 x the word fed in

    ids, traces = beam_search(step, torch.zeros(2 * 3, 1), batch=2, beam=3, max_steps=5, bos=bos, eos=eos, pad=pad)
    assert ids.tolist()[0][:3] == [4, 5, eos] and ids.tolist()[1][:3] == [4, 5, eos]
    assert traces.tolist()[0][:3] == [0, 40, 50]
    greedy_ids, _ = beam_search(step, torch.zeros(2, 1), batch=2, beam=1, max_steps=5, bos=bos, eos=eos, pad=pad)
    assert greedy_ids.tolist()[0][:2] == [3, eos]


def test_unknown_names_are_copied_from_the_attended_source_word(seq2seq) -> None:
    spanish = Vocab(list(seq2seq.SPECIALS) + ["dijo"])
    unk, eos = seq2seq.UNK_ID, seq2seq.EOS_ID
    ids = [spanish["dijo"], unk, unk, unk, eos, spanish["dijo"]]
    words = ["Yes", "Zecher", "wept"]  # capitalised as the first word, a name, a lower-case word
    assert seq2seq.to_text(ids, [1, 0, 1, 2, 0, 0], words, spanish) == ["dijo", "Zecher"]


def test_bleu_is_sacrebleu_on_a_known_pair() -> None:
    # 7/8 unigrams, 6/7 bigrams, 5/6 trigrams, 4/5 four-grams match, same length: BLEU = 100 * 0.5 ** 0.25
    assert corpus_bleu([["a", "b", "c", "d", "e", "f", "g", "h"]], ["a b c d e f g x"]) == pytest.approx(
        100 * 0.5 ** 0.25, abs=0.01)
    assert corpus_bleu([["Sea", "la", "luz", ".", "Y", "fué", "la", "luz", "."]],
                        ["Sea la luz. Y fué la luz."]) == pytest.approx(100.0)  # detokenized before scoring


def test_config_refuses_an_unknown_dataset(seq2seq) -> None:
    with pytest.raises(UserError, match="bible, toy"):
        seq2seq.Config(dataset="klingon")


# --- the toy pairs are learned exactly --------------------------------------------------------------------


def test_toy_run_learns_the_pairs_exactly(seq2seq, toy_run) -> None:
    metrics, run_dir = toy_run
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["tokens_per_s"] > 0
    english = [en for en, _ in seq2seq.TOY_PAIRS]
    for beam in (1, 5):
        results = seq2seq.predict(run_dir, english, beam=beam)
        assert [r["output"] for r in results] == [fr for _, fr in seq2seq.TOY_PAIRS]


def test_toy_run_writes_samples_and_attention(toy_run) -> None:
    _, run_dir = toy_run
    for name in ("checkpoint.pt", "attention.png", "samples.md", "curves.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    samples = (run_dir / "samples.md").read_text(encoding="utf-8")
    assert "**English:** hello world" in samples and "**Greedy:** bonjour monde" in samples


def test_same_seed_gives_the_same_run(seq2seq, toy_run, tmp_path: Path) -> None:
    """The schedule and the stop follow the step count, not the clock: a second run repeats the first exactly."""
    metrics, run_dir = toy_run
    values = catalog.config_values(catalog.get("seq2seq"), smoke=True, device="cpu", out=str(tmp_path))
    again = seq2seq.main(seq2seq.Config(**values))
    assert {k: v for k, v in again.items() if k != "tokens_per_s"} == {
        k: v for k, v in metrics.items() if k != "tokens_per_s"}
    assert rows(latest_run(tmp_path, "seq2seq")) == rows(run_dir)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(seq2seq, toy_run, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of an epoch, then --resume: every epoch's metrics and the final weights are those
    of the uninterrupted SMOKE run."""
    collate, calls = seq2seq.collate, []

    def interrupting_collate(*args, **kwargs):  # 4 training batches and 1 validation batch an epoch
        calls.append(1)
        if len(calls) == 53:  # the 3rd batch of epoch 11
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: the run stops after this step
        return collate(*args, **kwargs)

    monkeypatch.setattr(seq2seq, "collate", interrupting_collate)
    stopped = invoke("run", "seq2seq", "--smoke", "--device", "cpu", "--out", tmp_path)
    assert stopped.exit_code == 130, stopped.output
    run_dir = latest_run(tmp_path, "seq2seq")
    assert not (run_dir / "checkpoint.pt").exists() and [r["epoch"] for r in rows(run_dir)] == list(range(1, 11))
    monkeypatch.setattr(seq2seq, "collate", collate)
    resumed = invoke("run", "seq2seq", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "batch 3" in resumed.output
    assert rows(run_dir) == rows(toy_run[1])
    for name, tensor in weights(toy_run[1]).items():
        torch.testing.assert_close(weights(run_dir)[name], tensor, rtol=0, atol=0)


def test_predict_on_the_cli(toy_run) -> None:
    result = invoke("predict", "seq2seq", "--run", toy_run[1], "hello world", "--beam", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "hello world: bonjour monde"


def test_decoding_flags_on_the_cli(toy_run) -> None:
    """The guards are predict options: blocking and the length penalty off still translate the toy pairs; a
    bound of 1 x 2 source words + 0 leaves room for one word and <eos>."""
    free = invoke("predict", "seq2seq", "--run", toy_run[1], "hello world", "--no-repeat-ngram", "0",
                  "--length-penalty", "0")
    assert free.exit_code == 0, free.output
    assert free.stdout.strip() == "hello world: bonjour monde"
    for beam in ("1", "3"):
        cut = invoke("predict", "seq2seq", "--run", toy_run[1], "hello world", "--max-len-a", "1", "--max-len-b", "0",
                     "--beam", beam)
        assert cut.exit_code == 0, cut.output
        assert cut.stdout.strip() == "hello world: bonjour"


def test_negative_decoding_values_are_one_line_errors(toy_run) -> None:
    assert_one_line_error(invoke("predict", "seq2seq", "--run", toy_run[1], "hello", "--length-penalty", "-1"),
                          "must be >= 0")
    assert_one_line_error(invoke("predict", "seq2seq", "--run", toy_run[1], "hello", "--max-len-a", "0"),
                          "--max-len-a must be positive")


def test_the_notes_per_token_loop_is_a_bench_baseline() -> None:
    """`dlnotes bench seq2seq` also runs the notes' loop on the recipe's default model and data, and on the
    notes' own toy setup next to the recipe's batched step there (one batch of their 8 pairs, and the recipe's
    batch of 32 from them)."""
    from dlnotes import baselines

    loop, toy, full_batch = baselines.for_recipe("seq2seq")
    result = loop.run("cpu", sentences=2)
    assert result["throughput"] > 0 and result["throughput_unit"] == "tokens/s" and result["sentences"] == 2
    assert result["tokens"] >= 4  # at least a word and <eos> per sentence
    result = toy.run("cpu", hidden=16, rounds=1, epochs=5)
    assert result["throughput"] > 0 and result["recipe_throughput"] > 0 and result["throughput_unit"] == "tokens/s"
    assert result["sentences"] == result["batched_sentences"] == 8  # the notes' pairs
    result = full_batch.run("cpu", hidden=16, rounds=1, epochs=5)
    assert result["recipe_throughput"] > 0 and (result["sentences"], result["batched_sentences"]) == (8, 32)


# --- bad input --------------------------------------------------------------------------------------------


def test_empty_text_is_one_line_error(toy_run) -> None:
    assert_one_line_error(invoke("predict", "seq2seq", "--run", toy_run[1], "hello", ""), "Text 2 is empty")


def test_text_of_unknown_words_is_one_line_error(toy_run) -> None:
    assert_one_line_error(invoke("predict", "seq2seq", "--run", toy_run[1], "zyzzyva qwxp"),
                          "has no word this run knows", "English")


def test_overlong_text_is_truncated_with_a_note(toy_run) -> None:
    result = invoke("predict", "seq2seq", "--run", toy_run[1], "hello " * 60)
    assert result.exit_code == 0, result.output
    assert "note: text 1 has 60 tokens; only the first 40 are translated" in result.stderr


def test_bad_beam_is_one_line_error(toy_run) -> None:
    assert_one_line_error(invoke("predict", "seq2seq", "--run", toy_run[1], "hello", "--beam", "0"),
                          "--beam must be at least 1")


def test_wrong_dataset_name_is_one_line_error(out_dir: Path) -> None:
    assert_one_line_error(invoke("run", "seq2seq", "--dataset", "klingon", "--out", out_dir),
                          "Unknown --dataset 'klingon'", "bible, toy")
    assert not list(out_dir.iterdir())
