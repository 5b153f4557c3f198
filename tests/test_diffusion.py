"""The diffusion recipe: the forward process ends in N(0, 1), the judge tells digits from noise and variety from
collapse, a tiny run is judged by a cnn-mnist run and predicts, bad inputs are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, ctrl_c_after_update

from dlnotes import catalog
from dlnotes.datasets import load_image_dataset


@pytest.fixture(scope="module")
def diffusion():
    return catalog.load_module(catalog.get("diffusion"))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real cnn-mnist run, one epoch: a judge good enough to tell digits from noise, trained once per module."""
    cnn = catalog.load_module(catalog.get("cnn-mnist"))
    out = tmp_path_factory.mktemp("judge")
    metrics = cnn.main(cnn.Config(epochs=1, device="cpu", out=str(out)))
    assert metrics["test_acc"] > 0.9
    return next((out / "cnn-mnist").iterdir())


def test_forward_noising_ends_in_standard_normal_and_starts_at_the_digit(diffusion) -> None:
    data = load_image_dataset("mnist")
    x0 = torch.from_numpy(data.test_images).float().div(127.5).sub(1).unsqueeze(1)  # (1500, 1, 28, 28)
    a_bar = diffusion.alpha_bars(1000)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    last = diffusion.add_noise(x0, torch.full((len(x0),), 999), noise, a_bar)
    assert abs(last.mean().item()) < 0.01 and abs(last.std().item() - 1) < 0.01
    assert abs(np.corrcoef(last.flatten(), x0.flatten())[0, 1]) < 0.01  # nothing of the digit is left
    first = diffusion.add_noise(x0, torch.zeros(len(x0), dtype=torch.long), noise, a_bar)
    assert np.corrcoef(first.flatten(), x0.flatten())[0, 1] > 0.99  # one step in, the digit is all there


def test_the_judge_rejects_noise_and_diversity_catches_collapse(diffusion, cnn_run: Path) -> None:
    data = load_image_dataset("mnist")
    judge = diffusion.load_judge(cnn_run)
    real, labels = data.test_images, data.test_labels.astype(np.int64)
    assert diffusion.judged_accuracy(judge, real, labels) > 0.9
    noise = np.random.default_rng(0).integers(0, 256, real.shape).astype(np.uint8)
    assert diffusion.judged_accuracy(judge, noise, labels) < 0.3
    assert diffusion.diversity(real, labels, real, labels) == pytest.approx(1.0)
    collapsed = np.stack([real[np.flatnonzero(labels == c)[0]] for c in labels])  # one digit per class, repeated
    assert diffusion.judged_accuracy(judge, collapsed, labels) > 0.9  # the judge alone would pass it
    assert diffusion.diversity(collapsed, labels, real, labels) < 0.01  # diversity does not


def test_tiny_run_is_judged_by_the_newest_met_cnn_run_and_predicts(diffusion, cnn_run: Path, smoke_run,
                                                                    out_dir: Path) -> None:
    planted = out_dir / "cnn-mnist" / "20260101-000000"  # a run that met its target, where the recipe looks
    shutil.copytree(cnn_run, planted)
    summary = json.loads((planted / "summary.json").read_text())
    (planted / "summary.json").write_text(json.dumps(summary | {"target_met": True}))
    metrics, run_dir = smoke_run("diffusion", judge_samples=20)
    assert 0 <= metrics["judged_acc"] <= 1 and np.isfinite(metrics["diversity"])
    assert json.loads((run_dir / "config.json").read_text())["cnn-mnist"]["run"] == str(planted)
    assert (run_dir / "samples" / "epoch-001.png").is_file() and (run_dir / "denoising.gif").is_file()
    results = diffusion.predict(run_dir, ["4", "2"], per_digit=2)
    assert Path(results[0]["output"]).is_file() and results[0]["input"] == "4 2"


def test_judge_run_given_on_the_command_line(cnn_run: Path, smoke_run) -> None:
    metrics, run_dir = smoke_run("diffusion", judge_samples=10, judge_run=str(cnn_run))
    assert "judged_acc" in metrics
    assert json.loads((run_dir / "config.json").read_text())["cnn-mnist"]["run"] == str(cnn_run)


def test_unknown_digit_class_is_one_line(smoke_run, invoke) -> None:
    _, run_dir = smoke_run("diffusion")
    assert_one_line_error(invoke("predict", "diffusion", "--run", run_dir, "4", "x"), "Unknown digit class 'x'")
    assert_one_line_error(invoke("predict", "diffusion", "--run", run_dir, "12"), "Unknown digit class '12'")


def test_judge_run_of_another_recipe_is_one_line(invoke, out_dir: Path) -> None:
    other = out_dir / "mlp" / "20260101-000000"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"config": {}, "meta": {"recipe": "mlp"}}))
    result = invoke("run", "diffusion", "--judge-run", other, "--out", out_dir)
    assert_one_line_error(result, "is a run of 'mlp', not 'cnn-mnist'")
    assert not (out_dir / "diffusion").exists()  # refused before a run directory was made


def test_interrupted_and_resumed_run_ends_as_an_uninterrupted_one(smoke_run, out_dir: Path) -> None:
    """Exact resume: the noise, timesteps and label dropout come from the run's generator, saved with the weights."""
    from dlnotes import options
    from dlnotes.errors import TrainingInterrupted

    settings = {"epochs": 2, "limit_batches": 3}
    _, whole = smoke_run("diffusion", **settings)
    with ctrl_c_after_update(4):  # epoch 2, batch 1
        with pytest.raises(TrainingInterrupted, match="Interrupted at step 4"):
            smoke_run("diffusion", **settings, out=str(out_dir / "b"))
    interrupted = next((out_dir / "b" / "diffusion").iterdir())
    with options.using(options.RunOptions(resume=str(interrupted))):
        smoke_run("diffusion", **settings, out=str(out_dir / "b"))

    def rows(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "samples_per_s")}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert rows(interrupted) == rows(whole)
    resumed_weights = torch.load(interrupted / "checkpoint.pt", weights_only=True)["model"]
    for name, tensor in torch.load(whole / "checkpoint.pt", weights_only=True)["model"].items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0)
