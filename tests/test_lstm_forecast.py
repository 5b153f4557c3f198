"""lstm-forecast: the baselines by hand, learning on the real series, predict, exact resume, bad inputs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from dlnotes import catalog
from dlnotes.tracking import latest_run

RECIPE = "lstm-forecast"


def recipe():
    return catalog.load_module(catalog.get(RECIPE))


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_seasonal_naive_and_its_errors_by_hand() -> None:
    series = np.array([10.0, 20, 30, 11, 21, 31, 12, 22, 32, 13])  # season of 3, +1 a season
    forecast = recipe().seasonal_naive(series, np.array([6, 7]), horizon=4, period=3)
    # From origin 6 the last season seen is y[3:6] = 11, 21, 31; step 4 wraps round to y[3] again.
    assert forecast.tolist() == [[11, 21, 31, 11], [21, 31, 12, 21]]
    scores = recipe().errors(forecast[:1], series[None, 6:10], scale=0.5)  # truth 12, 22, 32, 13
    assert scores["mae"] == pytest.approx(1.25)  # |-1| + |-1| + |-1| + |-2|, over 4
    assert scores["rmse"] == pytest.approx(np.sqrt(7 / 4))
    assert scores["mase"] == pytest.approx(2.5)


def test_lstm_learns_and_both_baselines_are_scored(smoke_run) -> None:
    metrics, run_dir = smoke_run(RECIPE, epochs=10, sarima=True)
    history = rows(run_dir)
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert metrics["rmse_ratio"] < 1.0  # ten short epochs already beat "same month last year"
    assert metrics["sarima_rmse"] < metrics["snaive_rmse"]  # the trend SARIMA models is what naive misses
    assert metrics["snaive_mase"] == pytest.approx(metrics["snaive_mae"] / metrics["lstm_mae"] * metrics["lstm_mase"])
    assert (run_dir / "forecasts.png").is_file()


def test_checkpoint_predict_round_trip(smoke_run, invoke) -> None:
    _, run_dir = smoke_run(RECIPE, epochs=6)
    results = recipe().predict(run_dir, steps=15)  # beyond the 12-step horizon: fed back once
    assert [r["input"] for r in results][:2] == ["2002-01", "2002-02"] and results[-1]["input"] == "2003-03"
    values = [float(r["output"]) for r in results]
    assert all(355 < v < 390 for v in values), values  # ppm near the end of 2001 (about 370)
    result = invoke("predict", RECIPE, "--run", run_dir, "--steps", "3")
    assert result.exit_code == 0 and "2002-03:" in result.output, result.output
    assert_one_line_error(invoke("predict", RECIPE, "--run", run_dir, "2003"), "--steps N")
    assert_one_line_error(invoke("predict", RECIPE, "--run", run_dir, "--steps", "0"), "--steps must be")


def test_an_interrupted_run_resumes_exactly(invoke, out_dir: Path, tmp_path: Path) -> None:
    flags = ["--smoke", "--device", "cpu", "--out"]
    assert invoke("run", RECIPE, *flags, out_dir / "a").exit_code == 0
    straight = latest_run(out_dir / "a", RECIPE)
    assert invoke("run", RECIPE, *flags, out_dir / "b", "--save-every", "5", "--keep", "100").exit_code == 0
    # As if the run had stopped at step 20 (inside epoch 2): keep only what existed then.
    stopped = tmp_path / "stopped"
    shutil.copytree(latest_run(out_dir / "b", RECIPE), stopped)
    for path in (stopped / "checkpoints").glob("*.pt"):
        if path.name != "last-00000020.pt":
            path.unlink()
    (stopped / "checkpoint.pt").unlink()
    resumed = invoke("run", RECIPE, "--resume", stopped)
    assert resumed.exit_code == 0 and "resuming" in resumed.output, resumed.output
    assert rows(stopped) == rows(straight)
    final = torch.load(stopped / "checkpoint.pt", weights_only=True)["model"]
    for name, tensor in torch.load(straight / "checkpoint.pt", weights_only=True)["model"].items():
        torch.testing.assert_close(final[name], tensor)


@pytest.mark.parametrize("flags, fragment", [
    (["--horizon", "600"], "--horizon 600 must fit in the training part"),
    (["--window", "300", "--dataset", "sunspots"], "sunspots has 309 points"),
    (["--dataset", "tides"], "tides"),
])
def test_bad_settings_are_one_line(flags: list[str], fragment: str, invoke, out_dir: Path) -> None:
    assert_one_line_error(invoke("run", RECIPE, "--smoke", "--out", out_dir, *flags), fragment)
    assert not list(out_dir.glob("*/*"))  # refused before any run directory was made


def test_missing_statsmodels_is_one_line(invoke, out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "statsmodels.api", None)  # `import statsmodels.api` now fails
    assert_one_line_error(invoke("run", RECIPE, "--smoke", "--out", out_dir), "pip install statsmodels")
