"""The `dlnotes` CLI through Typer's runner, once as a real subprocess, and every bad input it must refuse."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error

from dlnotes import catalog
from dlnotes.checkpoint import save_checkpoint
from dlnotes.tracking import latest_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory, invoke) -> Path:
    """One short, real mlp run shared by the predict tests."""
    out = tmp_path_factory.mktemp("runs")
    result = invoke("run", "mlp", "--smoke", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    return latest_run(out, "mlp")


# --- the verbs ---------------------------------------------------------------------------------------------


def test_list_shows_every_recipe_with_target(invoke) -> None:
    result = invoke("list", "--json")
    assert result.exit_code == 0
    rows = {row["id"]: row for row in json.loads(result.output)}
    assert {"tensor-ops", "mlp", "cnn-mnist"} <= set(rows)
    assert rows["cnn-mnist"]["target"] == ["test_acc", 0.985, ">="]
    assert all(row["title"] and row["dataset"] for row in rows.values())


def test_list_filters_by_tag(invoke) -> None:
    rows = json.loads(invoke("list", "--tag", "cnn", "--json").output)
    assert "cnn-mnist" in [row["id"] for row in rows] and "mlp" not in [row["id"] for row in rows]
    assert all("cnn" in row["tags"] for row in rows)


def test_list_as_a_real_subprocess_imports_neither_torch_nor_typer() -> None:
    code = "import sys; from dlnotes.entry import main; sys.argv = ['dlnotes', 'list']\n" \
           "try:\n    main()\nexcept SystemExit:\n    pass\n" \
           "assert 'torch' not in sys.modules, 'list imported torch'\n" \
           "assert 'typer' not in sys.modules, 'list imported typer'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "cnn-mnist" in result.stdout
    exe = Path(sys.executable).with_name("dlnotes")
    result = subprocess.run([str(exe), "list"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "tensor-ops" in result.stdout, result.stderr


def test_show_prints_notes_and_source(invoke) -> None:
    result = invoke("show", "cnn-mnist")
    assert result.exit_code == 0
    assert "(B, 32, 7, 7)" in result.output and "class SimpleCNN" in result.output
    assert "class SimpleCNN" not in invoke("show", "cnn-mnist", "--no-code").output


def test_run_help_lists_config_flags_with_defaults(invoke) -> None:
    result = invoke("run", "cnn-mnist", "--help")
    assert result.exit_code == 0
    for flag in ("--epochs", "--batch-size", "--lr", "--device", "--seed", "--out", "--smoke", "--data-dir"):
        assert flag in result.output
    assert "[default: 5]" in result.output


def test_recipes_that_train_nothing_offer_no_resume_flags(invoke) -> None:
    """TRAINS = False (tensor-ops, llm-chat, llama-decode): no checkpoints, so no --resume/--save-every/--keep."""
    assert not any(catalog.get(r).trains for r in ("tensor-ops", "llm-chat", "llama-decode"))
    assert catalog.get("mlp").trains
    for recipe in ("tensor-ops", "llm-chat", "llama-decode"):
        result = invoke("run", recipe, "--help")
        assert result.exit_code == 0 and "--smoke" in result.output
        assert not any(flag in result.output for flag in ("--resume", "--save-every", "--keep"))
    assert_one_line_error(invoke("run", "tensor-ops", "--resume", "runs/x"), "No such option '--resume'")
    assert "--resume" in invoke("run", "mlp", "--help").output


def test_run_smoke_prints_summary_with_target_and_run_dir(tmp_path: Path, invoke) -> None:
    result = invoke("run", "cnn-mnist", "--smoke", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "test_acc" in result.output and "target" in result.output
    assert str(latest_run(tmp_path, "cnn-mnist")) in result.output


def test_smoke_verb_prints_a_table_and_passes(invoke) -> None:
    result = invoke("smoke", "tensor-ops", "mlp")
    assert result.exit_code == 0, result.output
    assert result.output.count("pass") == 2


def test_smoke_verb_exits_nonzero_when_a_recipe_fails(monkeypatch: pytest.MonkeyPatch, invoke) -> None:
    module = catalog.load_module(catalog.get("tensor-ops"))

    def broken(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr(module, "main", broken)
    result = invoke("smoke", "tensor-ops")
    assert result.exit_code == 1 and "FAIL" in result.output and "boom" in result.output


def test_cp_copy_runs_on_its_own(tmp_path: Path, invoke) -> None:
    result = invoke("cp", "mlp", tmp_path)
    assert result.exit_code == 0, result.output
    copy = tmp_path / "mlp.py"
    assert copy.read_text() == catalog.get("mlp").path.read_text()
    run = subprocess.run([sys.executable, str(copy), "--epochs", "1", "--limit-batches", "2", "--device", "cpu",
                          "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (latest_run(tmp_path / "runs", "mlp") / "checkpoint.pt").is_file()
    assert_one_line_error(invoke("cp", "mlp", tmp_path), "exists")


def test_predict_prints_top3_per_image(mlp_run: Path, tmp_path: Path, invoke) -> None:
    from PIL import Image

    # one line per input whatever the path: a long one is not wrapped, brackets are not markup
    image = tmp_path / ("a folder with a long name " * 4) / "seven [red]scan.png"
    image.parent.mkdir()
    Image.new("L", (50, 50), 255).save(image)
    result = invoke("predict", "mlp", "--run", mlp_run, image)
    assert result.exit_code == 0, result.output
    line, = result.output.splitlines()
    assert line.startswith(f"{image}: ") and len(line.removeprefix(f"{image}: ").split()) == 6


def test_runs_lists_finished_runs(mlp_run: Path, invoke) -> None:
    result = invoke("runs", "mlp", "--out", mlp_run.parents[1], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert str(mlp_run) in result.output and "test_acc" in result.output


# --- bad input: one line, non-zero exit, never a traceback ------------------------------------------------


def test_unknown_recipe_suggests_the_nearest(invoke) -> None:
    assert_one_line_error(invoke("run", "cnn-mnst"), "Unknown recipe 'cnn-mnst'", "Did you mean 'cnn-mnist'")
    assert_one_line_error(invoke("show", "mpl"), "Did you mean 'mlp'")


def test_unknown_flag(invoke) -> None:
    assert_one_line_error(invoke("run", "mlp", "--epoch", "3"), "No such option '--epoch'")


def test_wrong_type(invoke) -> None:
    assert_one_line_error(invoke("run", "mlp", "--epochs", "three"), "'--epochs'", "not a valid integer")


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--lr", "-0.1"), ("--batch-size", "0")])
def test_non_positive_values(flag: str, value: str, invoke) -> None:
    assert_one_line_error(invoke("run", "cnn-mnist", flag, value), f"{flag} must be positive")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device(invoke) -> None:
    assert_one_line_error(invoke("run", "mlp", "--smoke", "--device", "cuda"), "no CUDA GPU")
    assert_one_line_error(invoke("run", "mlp", "--smoke", "--device", "tpu"), "Unknown device 'tpu'")


def test_corrupt_data_file_fails_its_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, invoke) -> None:
    copy = tmp_path / "data"
    shutil.copytree(REPO / "data" / "mnist-10k", copy / "mnist-10k")
    labels = copy / "mnist-10k" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(labels.read_bytes())
    data[len(data) // 2] ^= 0xFF
    labels.write_bytes(bytes(data))
    monkeypatch.setattr("dlnotes.datasets.data_root", lambda: copy)
    assert_one_line_error(invoke("run", "mlp", "--smoke", "--out", tmp_path), "does not match its sha256")
    labels.unlink()
    assert_one_line_error(invoke("run", "mlp", "--smoke", "--out", tmp_path), "is missing")


def test_data_dir_without_idx_files(tmp_path: Path, invoke) -> None:
    assert_one_line_error(invoke("run", "mlp", "--smoke", "--data-dir", tmp_path), "has no train-images-idx3-ubyte")
    assert_one_line_error(invoke("run", "mlp", "--smoke", "--data-dir", tmp_path / "nope"), "does not exist")


def test_unknown_dataset_name(invoke) -> None:
    assert_one_line_error(invoke("run", "mlp", "--smoke", "--dataset", "cifar"), "Unknown --dataset 'cifar'",
                          "mnist, fashion-mnist")


def test_unwritable_out_is_an_error_before_training(tmp_path: Path, invoke) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_one_line_error(invoke("run", "mlp", "--smoke", "--out", blocker / "runs"), "Cannot write runs")


def test_predict_with_missing_run(tmp_path: Path, invoke) -> None:
    assert_one_line_error(invoke("predict", "mlp", "--run", tmp_path / "nope", "x.png"), "does not exist")
    assert_one_line_error(invoke("predict", "mlp", "--run", tmp_path, "x.png"), "has no checkpoint.pt")


@dataclass
class OtherConfig:
    epochs: int = 1


@pytest.mark.parametrize("recipe", sorted(r.id for r in catalog.all_recipes().values() if r.can_predict))
def test_predict_refuses_another_recipes_run(recipe: str, tmp_path: Path, invoke) -> None:
    """A run directory as `Run` and `save_checkpoint` write it, but of another recipe."""
    other = "cnn-mnist" if recipe == "mlp" else "mlp"
    save_checkpoint(tmp_path, other, torch.nn.Linear(2, 2), OtherConfig())
    (tmp_path / "config.json").write_text(json.dumps({"config": {"epochs": 1}, "meta": {"recipe": other}}))
    assert_one_line_error(invoke("predict", recipe, "--run", tmp_path, "x.png"),
                          f"is a run of '{other}', not '{recipe}'")


def test_predict_with_an_unreadable_image(mlp_run: Path, tmp_path: Path, invoke) -> None:
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    assert_one_line_error(invoke("predict", "mlp", "--run", mlp_run, not_an_image), "Cannot read")
    assert_one_line_error(invoke("predict", "mlp", "--run", mlp_run, tmp_path / "gone.png"), "does not exist")


def test_predict_on_a_recipe_without_a_model(mlp_run: Path, invoke) -> None:
    assert_one_line_error(invoke("predict", "tensor-ops", "--run", mlp_run), "trains no model")


def test_checkpoint_with_code_in_it_is_refused(mlp_run: Path, tmp_path: Path, invoke) -> None:
    evil_run = tmp_path / "evil"
    evil_run.mkdir()

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"recipe": "mlp", "model": Payload()}, evil_run / "checkpoint.pt")
    assert_one_line_error(invoke("predict", "mlp", "--run", evil_run, "x.png"), "refused")


def test_truncated_checkpoint(mlp_run: Path, tmp_path: Path, invoke) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(mlp_run, broken)
    data = (broken / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert_one_line_error(invoke("predict", "mlp", "--run", broken, "x.png"), "truncated or corrupt")


def test_serve_refuses_an_unknown_device(invoke) -> None:
    assert_one_line_error(invoke("serve", "--device", "tpu", "--port", "0"), "Unknown device 'tpu'")
