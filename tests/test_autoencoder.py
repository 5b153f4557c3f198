"""The autoencoder: Lightning and the plain loop train the same model to the same loss; Lightning's run directory,
checkpoints, resume and predict behave as every recipe's; bad inputs are one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image

from dlnotes import catalog
from dlnotes.checkpoint import load_state_file
from dlnotes.datasets import load_image_dataset


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("variational", [False, True])
def test_plain_and_lightning_give_the_same_loss_after_n_steps(smoke_run, variational: bool) -> None:
    plain, plain_dir = smoke_run("autoencoder", trainer="plain", limit_batches=12, variational=variational)
    lit, lit_dir = smoke_run("autoencoder", trainer="lightning", limit_batches=12, variational=variational)
    assert lit["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-6)
    assert lit["knn_acc"] == pytest.approx(plain["knn_acc"], abs=1e-9)
    for name, value in _weights(plain_dir).items():
        torch.testing.assert_close(_weights(lit_dir)[name], value, rtol=1e-6, atol=1e-7)
    other, _ = smoke_run("autoencoder", trainer="lightning", limit_batches=12, variational=variational, seed=1)
    assert other["test_loss"] != plain["test_loss"]  # the seed matters: the equality above is not a coincidence


def test_lightning_writes_the_house_run_directory(smoke_run) -> None:
    metrics, run_dir = smoke_run("autoencoder", epochs=2, limit_batches=30, variational=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "test_psnr" in r] == [1, 2]
    assert any("train_loss" in r and "step" in r for r in rows)
    assert metrics["knn_acc"] > 0.3  # chance is 0.1: the 3 numbers already know something about the digit
    for picture in ("reconstructions.png", "latent.png", "walk.png", "prior_samples.png", "curves.png"):
        assert (run_dir / picture).stat().st_size > 1000, picture
    last = sorted((run_dir / "checkpoints").glob("last-*.pt"))
    assert [p.name for p in last] == ["last-00000060.pt"]  # --keep 1 by default: the newest only
    state = load_state_file(last[0], "autoencoder")  # weights_only=True, this recipe's
    assert state["lightning"]["global_step"] == 60 and state["metrics_rows"] == len(rows)
    assert (run_dir / "checkpoints" / "best.pt").is_file()


def test_lightning_resume_continues_to_the_same_result(smoke_run) -> None:
    """One epoch, then `--resume --epochs 2` through the CLI: the same weights as two epochs in one go."""
    whole, whole_dir = smoke_run("autoencoder", epochs=2, limit_batches=15, variational=True)
    _, part_dir = smoke_run("autoencoder", epochs=1, limit_batches=15, variational=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "dlnotes", "run", "autoencoder", "--resume", str(part_dir),
                           "--epochs", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stdout
    resumed = json.loads((part_dir / "summary.json").read_text())["metrics"]
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-6)
    torch.testing.assert_close(_weights(part_dir), _weights(whole_dir))


def test_predict_encodes_and_reconstructs_image_files(smoke_run, tmp_path: Path) -> None:
    _, run_dir = smoke_run("autoencoder", epochs=1, limit_batches=40)
    data = load_image_dataset("mnist")
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(data.test_images[i]).resize((84, 84)).save(paths[-1])
    results = catalog.load_module(catalog.get("autoencoder")).predict(run_dir, paths)
    assert [r["input"] for r in results] == paths
    assert all(r["output"].startswith("code (") and "dB" in r["output"] for r in results)
    assert (run_dir / "predicted-reconstructions.png").is_file()


def test_unknown_trainer_is_one_line(invoke, out_dir: Path) -> None:
    result = invoke("run", "autoencoder", "--trainer", "keras", "--out", out_dir)
    assert_one_line_error(result, "keras", "lightning")


def test_resume_with_fewer_epochs_than_trained_is_one_line(smoke_run, invoke) -> None:
    _, run_dir = smoke_run("autoencoder", epochs=2, limit_batches=3)
    result = invoke("run", "autoencoder", "--resume", run_dir, "--epochs", "1")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--epochs 1 is fewer than the 2 epochs" in result.output


def test_ctrl_c_mid_epoch_saves_and_the_resumed_lightning_run_ends_as_an_uninterrupted_one(smoke_run, out_dir: Path,
                                                                                            monkeypatch) -> None:
    """A real Ctrl-C (SIGINT to this process) inside epoch 2's fourth step, then --resume: Lightning's loop, the
    batch order and the generator continue where they were, so the run ends as one that was never stopped."""
    from dlnotes import options
    from dlnotes.errors import TrainingInterrupted

    settings = {"epochs": 3, "batch_size": 16, "limit_batches": 10}
    whole, whole_dir = smoke_run("autoencoder", **settings)
    module = catalog.load_module(catalog.get("autoencoder"))
    training_step, steps = module.LitAutoEncoder.training_step, 0

    def step_then_ctrl_c(self, batch, batch_idx):
        nonlocal steps
        steps += 1
        if steps == 14:
            signal.raise_signal(signal.SIGINT)  # the run's handler: stop after this step, saving a checkpoint
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(module.LitAutoEncoder, "training_step", step_then_ctrl_c)
    with pytest.raises(TrainingInterrupted, match="Interrupted at step 14.*Resume with") as stopped:
        smoke_run("autoencoder", **settings, out=str(out_dir / "interrupted"))
    assert stopped.value.exit_code == 130
    monkeypatch.setattr(module.LitAutoEncoder, "training_step", training_step)
    run_dir = next((out_dir / "interrupted" / "autoencoder").iterdir())
    with options.using(options.RunOptions(resume=str(run_dir))):
        resumed, _ = smoke_run("autoencoder", **settings, out=str(out_dir / "interrupted"))
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-6)
    torch.testing.assert_close(_weights(run_dir), _weights(whole_dir))


def test_a_second_ctrl_c_under_lightning_quits_at_once_with_130_not_lightnings_1(smoke_run, monkeypatch) -> None:
    from dlnotes.interrupts import StopNow

    module = catalog.load_module(catalog.get("autoencoder"))
    training_step = module.LitAutoEncoder.training_step

    def step_then_two_ctrl_c(self, batch, batch_idx):
        if batch_idx == 2:  # both land inside a step: the first asks to stop after it, the second quits at once
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(module.LitAutoEncoder, "training_step", step_then_two_ctrl_c)
    with pytest.raises(StopNow) as stopped:  # Lightning catches it and calls sys.exit(1); the adapter gives it back
        smoke_run("autoencoder")
    assert stopped.value.exit_code == 130
