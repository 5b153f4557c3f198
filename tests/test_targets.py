"""Targets with a direction: `("test_acc", 0.985)` means at least, `("val_loss", 1.6, "<=")` at most."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from dlnotes.catalog import Target, read_recipe
from dlnotes.tracking import Run

LOWER_IS_BETTER_RECIPE = '''"""A tiny language model."""
TARGET = ("val_loss", 1.6, "<=")
'''


def test_a_target_without_a_direction_means_at_least() -> None:
    target = Target("test_acc", 0.96)
    assert target.met(0.96) and target.met(0.97) and not target.met(0.95)
    assert target.better(0.97, 0.96) and not target.better(0.95, 0.96) and target.better(0.1, None)
    assert str(target) == "test_acc ≥ 0.96"


def test_a_lower_is_better_target() -> None:
    target = Target("val_loss", 1.6, "<=")
    assert target.met(1.6) and target.met(1.2) and not target.met(1.7)
    assert target.better(1.2, 1.5) and not target.better(1.7, 1.5)
    assert str(target) == "val_loss ≤ 1.6"


def test_an_unknown_direction_is_refused() -> None:
    with pytest.raises(ValueError, match="direction"):
        Target("val_loss", 1.6, "<")


def test_the_catalog_reads_a_direction(tmp_path: Path) -> None:
    path = tmp_path / "tiny_lm.py"
    path.write_text(LOWER_IS_BETTER_RECIPE)
    assert read_recipe(path).target == Target("val_loss", 1.6, "<=")


@dataclass
class LmConfig:
    out: str = ""
    seed: int = 0


def test_summary_and_best_checkpoint_follow_a_lower_is_better_target(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "tiny_lm.py"
    path.write_text(LOWER_IS_BETTER_RECIPE)
    run = Run(str(path), LmConfig(out=str(tmp_path / "runs")))
    model = torch.nn.Linear(2, 2)
    run.attach(model)
    best_weights = []
    for epoch, val_loss in enumerate((2.0, 1.5, 1.8), 1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        if val_loss == 1.5:
            best_weights = model.weight.clone()
        run.end_epoch(epoch, val_loss=val_loss)
    best = torch.load(run.dir / "checkpoints" / "best.pt", weights_only=True)
    torch.testing.assert_close(best["model"]["weight"], best_weights)  # 1.5 was the best, not the last 1.8
    run.finish({"val_loss": 1.5})
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["target"] == ["val_loss", 1.6, "<="] and summary["target_met"] is True


TWO_TARGET_RECIPE = '''"""An autoencoder judged twice."""
TARGET = ("test_psnr", 14.0)
ALSO_TARGETS = (("knn_acc", 0.70),)
'''


@pytest.mark.parametrize(("knn_acc", "met"), [(0.69, False), (0.71, True)])
def test_a_run_meets_its_targets_only_when_it_meets_all_of_them(tmp_path: Path, knn_acc: float, met: bool) -> None:
    path = tmp_path / "judged_twice.py"
    path.write_text(TWO_TARGET_RECIPE)
    info = read_recipe(path)
    assert info.target == Target("test_psnr", 14.0) and info.also_targets == (Target("knn_acc", 0.70),)
    run = Run(str(path), LmConfig(out=str(tmp_path / "runs")))
    run.finish({"test_psnr": 15.0, "knn_acc": knn_acc})  # the first target is met either way
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["target_met"] is met
    assert summary["also_targets"] == [["knn_acc", 0.70, ">=", met]]


def test_also_targets_must_be_a_tuple_of_targets(tmp_path: Path) -> None:
    from dlnotes.errors import UserError

    path = tmp_path / "bad.py"
    path.write_text('"""Bad."""\nTARGET = ("test_psnr", 14.0)\nALSO_TARGETS = ("knn_acc", 0.70)\n')
    with pytest.raises(UserError, match="ALSO_TARGETS"):
        read_recipe(path)


def test_a_run_that_raises_before_finish_is_closed_when_its_launch_ends(tmp_path: Path) -> None:
    """Its Ctrl-C handler goes back to whoever had it and its lock file goes, so a later --resume in the same
    process (a notebook, the tests) is not refused by a run that is long over."""
    import signal

    import torch

    from dlnotes import options
    from dlnotes.errors import UserError

    path = tmp_path / "tiny_lm.py"
    path.write_text(LOWER_IS_BETTER_RECIPE)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(UserError, match="bad data"), options.using(options.RunOptions()):
        run = Run(str(path), LmConfig(out=str(tmp_path / "runs")))
        run.attach(torch.nn.Linear(2, 2))  # watches Ctrl-C from here on
        assert signal.getsignal(signal.SIGINT) is not before and (run.dir / ".lock").is_file()
        raise UserError("bad data")  # a recipe failing mid-run, without finish()
    assert signal.getsignal(signal.SIGINT) is before
    assert not (run.dir / ".lock").exists()
