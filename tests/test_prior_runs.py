"""prior_runs: the newest run of another recipe that met its target, or train it first; a named run checked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from dlnotes import catalog, prior_runs
from dlnotes.errors import UserError

# A recipe that trains nothing: its run reports --score, and it met its target when the score is >= 0.5.
FAKE_RECIPE = '''
"""Fake recipe: a run whose only metric is its --score."""

from dataclasses import dataclass

from dlnotes.launch import cli
from dlnotes.tracking import Run

TARGET = ("score", 0.5)


@dataclass
class Config:
    score: float = {score}  # what the run reports
    device: str = "auto"  # passed through by prior_runs
    out: str = "runs"  # where runs go


def main(cfg: Config) -> dict[str, float]:
    run = Run(__file__, cfg, cfg.device)
    return run.finish({{"score": cfg.score}})


if __name__ == "__main__":
    cli(Config, main)
'''


@pytest.fixture
def fake_recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A recipes folder with `good` (default score 0.9, meets its target) and `weak` (0.1, does not)."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "good.py").write_text(FAKE_RECIPE.format(score=0.9))
    (folder / "weak.py").write_text(FAKE_RECIPE.format(score=0.1))
    monkeypatch.setenv("DLNOTES_RECIPES", str(folder))  # the catalog reads these instead of recipes/
    return folder


def write_run(out: Path, recipe: str, name: str, summary: dict | str | None, owner: str | None = None) -> Path:
    """A run directory as tracking writes it: config.json always, summary.json when the run finished."""
    run_dir = out / recipe / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": {}, "meta": {"recipe": owner or recipe}}))
    if summary is not None:
        (run_dir / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    return run_dir


def summary(recipe: str, acc: float) -> dict:
    return {"recipe": recipe, "metrics": {"test_acc": acc}, "target": ["test_acc", 0.985, ">="],
            "target_met": acc >= 0.985}


def test_newest_met_run_skips_newer_runs_that_missed_did_not_finish_or_are_corrupt(out_dir: Path) -> None:
    write_run(out_dir, "cnn-mnist", "20260101-090000", summary("cnn-mnist", 0.990))
    write_run(out_dir, "cnn-mnist", "20260102-090000-2", summary("cnn-mnist", 0.991))
    chosen = write_run(out_dir, "cnn-mnist", "20260102-090000-10", summary("cnn-mnist", 0.987))  # -10 after -2
    write_run(out_dir, "cnn-mnist", "20260103-090000", summary("cnn-mnist", 0.970))  # finished, target missed
    write_run(out_dir, "cnn-mnist", "20260104-090000", None)  # still running or killed
    write_run(out_dir, "cnn-mnist", "20260105-090000", '{"recipe": "cnn-mn')  # half-written
    write_run(out_dir, "cnn-mnist", "20260106-090000", {"recipe": "cnn-mnist"})  # no metrics: an older format
    write_run(out_dir, "mlp", "20260107-090000", summary("mlp", 0.999))  # another recipe

    used = prior_runs.newest_met_run(out_dir, "cnn-mnist")

    assert used is not None and used.dir == chosen
    assert (used.metric, used.value, used.target_met, used.trained_now) == ("test_acc", 0.987, True, False)
    assert prior_runs.newest_met_run(out_dir, "seq2seq") is None


def test_an_existing_met_run_is_used_without_training(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = write_run(out_dir, "cnn-mnist", "20260101-090000", summary("cnn-mnist", 0.99))
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("trained although a met run exists"))

    assert prior_runs.met_run_or_train("cnn-mnist", out_dir, "cpu").dir == chosen


def test_without_a_met_run_the_recipe_is_trained_first_and_recorded(fake_recipes: Path, out_dir: Path,
                                                                    tmp_path: Path) -> None:
    """An outer recipe asks for a `good` run: none exists (only one that missed), so `good` trains in a child
    process with its defaults; the outer run records which run it used in its config.json."""
    outer_file = tmp_path / "judge.py"
    outer_file.write_text(FAKE_RECIPE.format(score=1.0))
    write_run(out_dir, "good", "20200101-000000", {"recipe": "good", "metrics": {"score": 0.2},
                                                   "target": ["score", 0.5, ">="], "target_met": False})
    from dlnotes.tracking import Run

    @dataclass
    class OuterConfig:
        device: str = "cpu"
        out: str = str(out_dir)

    used = prior_runs.met_run_or_train("good", out_dir, "cpu")
    run = Run(str(outer_file), OuterConfig(), "cpu")
    run.record("good", used.as_record())
    run.finish({"score": 1.0})
    assert run.dir.parent == out_dir / "judge"

    assert used.trained_now and used.target_met and used.value == 0.9
    assert used.dir.parent == out_dir / "good" and used.dir.name != "20200101-000000"
    trained = json.loads((used.dir / "config.json").read_text())
    assert trained["config"] == {"score": 0.9, "device": "cpu", "out": str(out_dir)}  # the defaults
    recorded = json.loads((run.dir / "config.json").read_text())["good"]
    assert recorded == {"run": str(used.dir), "metric": "score", "value": 0.9, "target_met": True,
                        "trained_now": True}
    assert prior_runs.UsedRun.from_record("good", recorded) == used  # what the other ranks rebuild
    assert prior_runs.met_run_or_train("good", out_dir, "cpu").dir == used.dir  # now found, not trained again


def test_a_recipe_that_misses_its_target_after_training_is_one_clear_error(fake_recipes: Path, out_dir: Path) -> None:
    with pytest.raises(UserError) as err:
        prior_runs.met_run_or_train("weak", out_dir, "cpu")

    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("weak trained with its defaults did not meet its target (score ≥ 0.5): score = 0.1")


def test_a_named_run_of_another_recipe_is_one_clear_error(out_dir: Path) -> None:
    mlp_run = write_run(out_dir, "mlp", "20260101-090000", summary("mlp", 0.97))
    unfinished = write_run(out_dir, "cnn-mnist", "20260102-090000", None)
    finished = write_run(out_dir, "cnn-mnist", "20260103-090000", summary("cnn-mnist", 0.97))

    cases = {mlp_run: f"--judge-run {mlp_run} is a run of 'mlp', not 'cnn-mnist'.",
             out_dir: f"--judge-run {out_dir} is not a run directory (no config.json).",
             unfinished: f"--judge-run {unfinished} has no readable summary.json: that run did not finish."}
    for run_dir, expected in cases.items():
        with pytest.raises(UserError) as err:
            prior_runs.given_run(run_dir, "cnn-mnist", "--judge-run")
        assert str(err.value) == expected

    used = prior_runs.given_run(finished, "cnn-mnist", "--judge-run")  # a missed target is the user's choice
    assert (used.dir, used.value, used.target_met) == (finished, 0.97, False)


def test_the_fake_recipe_is_a_valid_catalog_entry(fake_recipes: Path) -> None:
    """Guards the fixture: if the fake recipe stopped parsing, the tests above would test nothing."""
    info = catalog.get("good")
    assert str(info.target) == "score ≥ 0.5" and info.field("out") and info.field("device")
    assert textwrap.dedent(info.title) == "Fake recipe: a run whose only metric is its --score."


# An outer recipe under torchrun: both ranks ask for a `good` run; rank 0 trains it once and tells rank 1.
JUDGE_RECIPE = '''
"""Fake outer recipe: two processes ask prior_runs for a `good` run."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dlnotes import distributed, prior_runs
from dlnotes.launch import cli

DISTRIBUTED = True


@dataclass
class Config:
    device: str = "cpu"  # gloo
    out: str = "runs"  # where runs go


def main(cfg: Config) -> dict[str, float]:
    distributed.start(torch.device("cpu"))
    used = prior_runs.met_run_or_train("good", cfg.out, cfg.device)
    (Path(cfg.out) / f"rank{distributed.rank()}.json").write_text(json.dumps(used.as_record()))
    return {}


if __name__ == "__main__":
    cli(Config, main)
'''


def test_in_a_two_process_run_rank_0_trains_once_and_every_rank_gets_the_run(fake_recipes: Path, out_dir: Path,
                                                                             tmp_path: Path) -> None:
    judge = tmp_path / "judge.py"
    judge.write_text(JUDGE_RECIPE)
    result = subprocess.run([sys.executable, str(judge), "--nproc", "2", "--out", str(out_dir)],
                            capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    trained = list((out_dir / "good").iterdir())
    assert len(trained) == 1  # one child run, started by rank 0 alone, trained as a single process
    assert json.loads((trained[0] / "config.json").read_text())["meta"]["world_size"] == 1
    records = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0] == records[1] == {"run": str(trained[0]), "metric": "score", "value": 0.9,
                                        "target_met": True, "trained_now": True}
