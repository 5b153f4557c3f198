"""fasttext: tokenizers and features, a smoke run, learning above chance, predict round trips, bad inputs."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from typer.testing import CliRunner

from dlnotes import catalog
from dlnotes.cli import app
from dlnotes.errors import UserError
from dlnotes.text import UNK, Vocab, char_tokens, detokenize, word_tokens
from dlnotes.tracking import latest_run


@pytest.fixture(scope="module")
def fasttext():
    return catalog.load_module(catalog.get("fasttext"))


def train(fasttext, out: Path, **overrides: object) -> tuple[dict[str, float], Path]:
    cfg = fasttext.Config(**({"device": "cpu", "out": str(out), "buckets": 50_000} | overrides))
    return fasttext.main(cfg), latest_run(out, "fasttext")


@pytest.fixture(scope="module")
def english_run(fasttext, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path]:
    """One epoch on all 10,200 English snippets: a few seconds."""
    return train(fasttext, tmp_path_factory.mktemp("runs"), epochs=1)


@pytest.fixture(scope="module")
def chinese_run(fasttext, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path]:
    """100 batches (3,200 reviews) of Chinese."""
    return train(fasttext, tmp_path_factory.mktemp("runs"), dataset="chinese-reviews", epochs=1, limit_batches=100)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])



# --- tokens and features ----------------------------------------------------------------------------------


def test_english_word_tokens() -> None:
    assert word_tokens("A dull, lifeless film -- don't see it!") == [
        "a", "dull", ",", "lifeless", "film", "-", "-", "don't", "see", "it", "!"]
    assert word_tokens("En el principio crió Dios", lower=False) == ["En", "el", "principio", "crió", "Dios"]


def test_chinese_character_tokens() -> None:
    assert char_tokens("这个东西 真心很赞！") == ["这", "个", "东", "西", "真", "心", "很", "赞", "！"]
    assert char_tokens("iPhone好") == ["i", "p", "h", "o", "n", "e", "好"]


def test_detokenize_puts_punctuation_back() -> None:
    assert detokenize(["¿", "Quién", "es", "(", "él", ")", "?"]) == "¿Quién es (él)?"
    assert detokenize(word_tokens("Y dijo Dios: Sea la luz; y fué la luz.", lower=False)) == \
        "Y dijo Dios: Sea la luz; y fué la luz."


def test_vocabulary_comes_from_training_tokens_and_maps_unknown_tokens() -> None:
    vocab = Vocab.build([["good", "film"], ["good", "plot"], ["bad"]], min_count=2)
    assert vocab.tokens == ["<pad>", UNK, "good"]  # specials first; 'film', 'plot', 'bad' seen once
    assert vocab.encode(["good", "zyzzyva"]) == [2, vocab.unk_id]
    assert Vocab(vocab.tokens).encode(["good"]) == [2]  # rebuilt from the plain list a checkpoint keeps
    with pytest.raises(ValueError):
        Vocab(["a", "b"])


def test_ngrams_and_hashed_ids(fasttext) -> None:
    assert fasttext.ngrams(["a", "b", "c"], 3) == ["a", "b", "c", "a b", "b c", "a b c"]
    vocab = Vocab.build([["a", "dull", "film"]])
    ids = fasttext.feature_ids(["a", "dull", "film", "zzz"], vocab, n=2, buckets=1000)
    assert ids[:4] == vocab.encode(["a", "dull", "film", "zzz"])
    assert ids[4] == len(vocab) + zlib.crc32(b"a dull") % 1000  # stable across processes, unlike hash()
    assert all(len(vocab) <= i < len(vocab) + 1000 for i in ids[4:]) and len(ids) == 7


def test_config_resolves_ngrams_per_language(fasttext) -> None:
    assert fasttext.Config(dataset="rotten-tomatoes").ngrams == 2
    assert fasttext.Config(dataset="chinese-reviews").ngrams == 3
    with pytest.raises(UserError, match="rotten-tomatoes, chinese-reviews"):
        fasttext.Config(dataset="imdb")


def test_model_shapes_and_pooling(fasttext) -> None:
    model = fasttext.FastText(100, 8, 2, pooling="sqrt")
    ids, offsets = fasttext.collate([torch.tensor([1, 2, 3]), torch.tensor([4])], [0, 1])
    assert ids.tolist() == [1, 2, 3, 4] and offsets.tolist() == [0, 3]
    assert model(ids, offsets).shape == (2, 2)
    pooled = model.embedding(ids, offsets, per_sample_weights=torch.tensor([3 ** -0.5] * 3 + [1.0]))
    expected = model.embedding.weight[[1, 2, 3]].sum(0) / math.sqrt(3)
    assert torch.allclose(pooled[0], expected, atol=1e-6)


# --- training ---------------------------------------------------------------------------------------------


def test_smoke_run_writes_the_run_directory(smoke_run) -> None:
    metrics, run_dir = smoke_run("fasttext")
    assert all(math.isfinite(v) for v in metrics.values())
    assert {"test_acc", "tfidf_svm_test_acc"} <= set(metrics)
    for name in ("checkpoint.pt", "confusion.png", "curves.png", "summary.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name


def test_english_run_learns_well_above_chance(english_run) -> None:
    metrics, _ = english_run
    assert metrics["test_acc"] > 0.72  # 58 % of the test snippets are positive
    assert metrics["tfidf_svm_test_acc"] > 0.72


def test_chinese_run_learns_above_chance(chinese_run) -> None:
    metrics, _ = chinese_run
    assert metrics["test_acc"] > 0.7  # 52 % of the test reviews are negative


def test_predict_round_trip_english(fasttext, english_run) -> None:
    _, run_dir = english_run
    results = fasttext.predict(run_dir, ["a moving, beautifully acted and wonderful film",
                                         "a dull, lifeless and boring mess"])
    assert [r["top"][0][0] for r in results] == ["positive", "negative"]
    for result in results:
        assert {label for label, _ in result["top"]} == {"positive", "negative"}
        assert sum(p for _, p in result["top"]) == pytest.approx(1.0, abs=1e-5)


def test_predict_round_trip_chinese_on_the_cli(chinese_run) -> None:
    _, run_dir = chinese_run
    result = invoke("predict", "fasttext", "--run", run_dir, "这个东西真心很赞")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("这个东西真心很赞: ") and "positive" in result.output


# --- bad input --------------------------------------------------------------------------------------------


def test_empty_text_is_one_line_error(english_run) -> None:
    assert_one_line_error(invoke("predict", "fasttext", "--run", english_run[1], "fine", "  "),
                          "Text 2 is empty")


def test_no_texts_is_one_line_error(english_run) -> None:
    assert_one_line_error(invoke("predict", "fasttext", "--run", english_run[1]), "at least one input")


def test_text_of_unknown_tokens_names_the_language(english_run, chinese_run) -> None:
    assert_one_line_error(invoke("predict", "fasttext", "--run", english_run[1], "这个东西真心很赞"),
                          "no token this run knows", "English (trained on rotten-tomatoes)")
    assert_one_line_error(invoke("predict", "fasttext", "--run", chinese_run[1], "a dull film"),
                          "reads Chinese")


def test_overlong_text_is_truncated_with_a_note(english_run) -> None:
    result = invoke("predict", "fasttext", "--run", english_run[1], "great " * 500)
    assert result.exit_code == 0, result.output
    assert "note: text 1 has 500 tokens; truncated to the first 400" in result.stderr
    assert "positive" in result.stdout


def test_wrong_dataset_name_is_one_line_error(out_dir: Path) -> None:
    result = invoke("run", "fasttext", "--dataset", "imdb", "--out", out_dir)
    assert_one_line_error(result, "Unknown --dataset 'imdb'", "rotten-tomatoes, chinese-reviews")
    assert not list(out_dir.iterdir())  # refused before a run directory was made


def test_missing_run_directory_is_one_line_error(tmp_path: Path) -> None:
    assert_one_line_error(invoke("predict", "fasttext", "--run", tmp_path / "nope", "good"), "does not exist")
