"""transformer-mt: the masks, parallel = step-by-step decoding, the toy pairs learned and translated back from
a checkpoint, BLEU by slice, the LSTM at equal training time in bench, exact resume, bad inputs."""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from typer.testing import CliRunner

from dlnotes import baselines, bench, catalog
from dlnotes.cli import app
from dlnotes.errors import UserError
from dlnotes.tracking import latest_run
from dlnotes.translation import BOS_ID, EOS_ID, PAD_ID, TOY_PAIRS, bleu_by_group, group_metrics


@pytest.fixture(scope="module")
def mt():
    return catalog.load_module(catalog.get("transformer-mt"))


@pytest.fixture(scope="module")
def toy_run(mt, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path]:
    """The SMOKE run: the notes' toy pairs, a one-layer model, seconds."""
    out = tmp_path_factory.mktemp("runs")
    values = catalog.config_values(catalog.get("transformer-mt"), smoke=True, device="cpu", out=str(out))
    return mt.main(mt.Config(**values)), latest_run(out, "transformer-mt")


def tiny_model(mt, vocab: int = 20) -> torch.nn.Module:
    torch.manual_seed(0)
    return mt.TransformerMT(vocab, vocab, d_model=16, heads=2, layers=2, ff=32, dropout=0.0).eval()


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock column, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


# --- the masks --------------------------------------------------------------------------------------------


def test_a_padded_source_position_changes_nothing(mt) -> None:
    model = tiny_model(mt)
    decoder_in = torch.tensor([[BOS_ID, 8, 9]])
    alone = model(torch.tensor([[5, 6, 7]]), decoder_in)  # (1, 3, V)
    padded = model(torch.tensor([[5, 6, 7, PAD_ID, PAD_ID], [10, 11, 12, 13, 14]]), decoder_in.repeat(2, 1))
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)
    # Without the mask the <pad> positions (embedding 0, but a position code) would be attended to:
    memory, padding = model.encode(torch.tensor([[5, 6, 7, PAD_ID, PAD_ID]]))
    unmasked = model.decode(decoder_in, memory, torch.zeros_like(padding))
    assert not torch.allclose(unmasked[0], alone[0], atol=1e-3)


def test_the_decoder_cannot_see_future_target_words(mt) -> None:
    model = tiny_model(mt)
    source = torch.tensor([[5, 6, 7]])
    before = model(source, torch.tensor([[BOS_ID, 8, 9, 10, 11]]))  # (1, 5, V)
    after = model(source, torch.tensor([[BOS_ID, 8, 9, 15, 11]]))  # word 3 changed
    torch.testing.assert_close(after[:, :3], before[:, :3], atol=1e-6, rtol=0)  # positions 0..2 never saw it
    assert not torch.allclose(after[:, 3], before[:, 3], atol=1e-4)  # position 3 reads it


def test_greedy_generation_equals_feeding_back_the_argmax(mt) -> None:
    model = tiny_model(mt)
    source = torch.tensor([[5, 6, 7], [8, 9, PAD_ID]])
    ids = mt.generate(model, source, max_steps=6)  # (2, T); the 6th word can only be <eos>
    for row in range(2):
        words = [BOS_ID]
        for _ in range(5):
            next_word = int(model(source[row : row + 1, : 3 - row], torch.tensor([words]))[0, -1].argmax())
            words.append(next_word)
            if next_word == EOS_ID:
                break
        assert ids[row].tolist()[: len(words) - 1] == words[1:]


def test_beam_of_one_is_greedy_and_beam_five_runs(mt) -> None:
    model = tiny_model(mt)
    source = torch.tensor([[5, 6, 7], [8, 9, PAD_ID]])
    greedy = mt.generate(model, source, max_steps=torch.tensor([5, 4]), beam=1)
    assert (greedy[1, 4:] == PAD_ID).all()  # the bound of each sentence
    beam = mt.generate(model, source, max_steps=8, beam=5, no_repeat_ngram=2)
    assert beam.shape[0] == 2 and beam.size(1) <= 8


# --- the toy pairs ----------------------------------------------------------------------------------------


def test_toy_run_learns_the_pairs(mt, toy_run) -> None:
    metrics, run_dir = toy_run
    assert all(math.isfinite(v) for v in metrics.values())
    losses = [r["train_loss"] for r in rows(run_dir)]
    assert losses[-1] < 0.5 * losses[0]  # label smoothing keeps the floor above 0
    assert metrics["val_loss"] < 0.5


def test_summary_and_samples_break_bleu_down_by_length_and_rare_words(toy_run) -> None:
    metrics, run_dir = toy_run  # toy sentences are too short for 4-grams: BLEU 0, so the slices are counted here
    assert [k for k in metrics if k.startswith("bleu_")] == ["bleu_words_1_5", "bleu_unseen", "bleu_rare"]
    samples = (run_dir / "samples.md").read_text()  # "good night world": "good" and "night" are seen once each
    assert "| words 1-5 | 8 | 0.00 |" in samples and "| unseen | 1 |" in samples and "| rare | 7 |" in samples


def test_bleu_slices_split_by_english_length_and_the_rarest_word() -> None:
    train = [("the lord said", "")] * 10 + [("moses said", "")] * 3 + [("aaron", "")]
    sources = ["the lord said", "moses said " + "the lord " * 4, "aaron said", "the lord said to pharaoh"]
    references = ["uno dos tres cuatro", "cinco seis siete ocho", "nueve diez once doce", "a b c d e"]
    outputs = [r.split() for r in references[:2]] + [["x"], references[3].split()]
    groups = bleu_by_group(sources, references, outputs, train)
    assert list(groups) == ["words 1-5", "words 6-10", "unseen", "rare", "common"]
    assert {name: row["pairs"] for name, row in groups.items()} == {"words 1-5": 3, "words 6-10": 1, "unseen": 2,
                                                                   "rare": 1, "common": 1}
    assert groups["common"]["bleu"] == pytest.approx(100) and groups["rare"]["bleu"] == pytest.approx(100)
    assert groups["unseen"]["bleu"] < 90  # "aaron" was seen once (<unk> to both models), "pharaoh" never
    assert group_metrics(groups)["bleu_words_6_10"] == pytest.approx(100)


def test_the_lstm_baseline_trains_for_the_transformers_training_time(toy_run, tmp_path: Path) -> None:
    base = baselines.find("transformer-mt", "LSTM seq2seq, same training time")
    assert base.after_recipe
    run = tmp_path / "run"  # the toy run's summary, with a training time of 1.5 s (the real one takes longer)
    run.mkdir()
    shutil.copy(toy_run[1] / "summary.json", run / "summary.json")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "time_s": 0.5}\n{"epoch": 2, "time_s": 1.5}\n')
    result = base.run("cpu", str(run), dataset="toy")
    assert 1.5 <= result["training_s"] < 3.0  # stops at the budget (one batch past it at most)
    assert result["steps"] > 0 and result["throughput_unit"] == "tokens/s" and 0 <= result["metric"] <= 100
    assert "bleu_rare" in result and result["recipe_slices"]["bleu_rare"] == toy_run[0]["bleu_rare"]


def test_bench_hands_the_recipes_run_to_a_baseline_that_measures_against_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_worker(info, device, folder, attempt, baseline="", stem="", recipe_run=""):
        seen.append((baseline, recipe_run))
        if baseline:
            return {"metric": 17.0, "target_met": True, "throughput": 900.0, "throughput_unit": "tokens/s",
                    "wall_s": 60.0}
        return {"metric": 18.0, "target_met": True, "wall_s": 70.0, "time_to_target_s": 70.0, "throughput": 600.0,
                "throughput_unit": "tokens/s", "run_dir": "RUN"}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    folder, _ = bench.run_bench([catalog.get("transformer-mt")], 1, "cpu", tmp_path, report=lambda line: None)
    assert seen == [("", ""), ("LSTM seq2seq, same training time", "RUN")]
    assert "| transformer-mt baseline: LSTM seq2seq, same training time | test_bleu ≥ 15 | 17.0000 |" in (
        folder / "bench.md").read_text()


@pytest.mark.parametrize("beam", [1, 5])
def test_checkpoint_predict_round_trip(mt, toy_run, beam: int) -> None:
    results = mt.predict(toy_run[1], [en for en, _ in TOY_PAIRS], beam=beam)
    assert [r["output"] for r in results] == [fr for _, fr in TOY_PAIRS]


def test_predict_on_the_cli_with_decoding_flags(toy_run) -> None:
    result = invoke("predict", "transformer-mt", "--run", toy_run[1], "thank you my friend", "--beam", "3",
                    "--no-repeat-ngram", "0", "--length-penalty", "0.6")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "thank you my friend: merci mon ami"


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(mt, toy_run, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of an epoch, then --resume: every epoch's metrics and the final weights are those
    of the uninterrupted SMOKE run."""
    collate, calls = mt.collate, []

    def interrupting_collate(*args, **kwargs):  # 4 training batches and 1 validation batch an epoch
        calls.append(1)
        if len(calls) == 53:  # the 3rd batch of epoch 11
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: the run stops after this step
        return collate(*args, **kwargs)

    monkeypatch.setattr(mt, "collate", interrupting_collate)
    stopped = invoke("run", "transformer-mt", "--smoke", "--device", "cpu", "--out", tmp_path)
    assert stopped.exit_code == 130, stopped.output
    run_dir = latest_run(tmp_path, "transformer-mt")
    assert not (run_dir / "checkpoint.pt").exists() and [r["epoch"] for r in rows(run_dir)] == list(range(1, 11))
    monkeypatch.setattr(mt, "collate", collate)
    resumed = invoke("run", "transformer-mt", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "batch 3" in resumed.output
    assert rows(run_dir) == rows(toy_run[1])
    for name, tensor in weights(toy_run[1]).items():
        torch.testing.assert_close(weights(run_dir)[name], tensor, rtol=0, atol=0)


# --- bad input --------------------------------------------------------------------------------------------


def test_empty_sentence_is_one_line_error(toy_run) -> None:
    assert_one_line_error(invoke("predict", "transformer-mt", "--run", toy_run[1], "hello", "  "), "Text 2 is empty")


def test_unknown_flag_is_one_line_error(toy_run) -> None:
    assert_one_line_error(invoke("predict", "transformer-mt", "--run", toy_run[1], "hello", "--temperature", "2"),
                          "--temperature")
    assert_one_line_error(invoke("run", "transformer-mt", "--smoke", "--wings", "2"), "--wings")


def test_sentence_of_unknown_words_is_one_line_error(toy_run) -> None:
    assert_one_line_error(invoke("predict", "transformer-mt", "--run", toy_run[1], "zyzzyva qwxp"),
                          "has no word this run knows")


def test_bad_decoding_values_are_one_line_errors(toy_run) -> None:
    assert_one_line_error(invoke("predict", "transformer-mt", "--run", toy_run[1], "hello", "--beam", "0"),
                          "--beam must be at least 1")
    assert_one_line_error(invoke("predict", "transformer-mt", "--run", toy_run[1], "hello", "--no-repeat-ngram",
                                 "-1"), "must be >= 0")


def test_config_refuses_heads_that_do_not_divide_the_width(mt) -> None:
    with pytest.raises(UserError, match="multiple of --heads"):
        mt.Config(d_model=30, heads=4)
