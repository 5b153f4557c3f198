"""Training that survives interruption: Ctrl-C, resume, periodic checkpoints, divergence, unsafe files."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, ctrl_c_after_update
from typer.testing import CliRunner

from dlnotes.cli import app
from dlnotes.errors import UserError
from dlnotes.tracking import latest_run, new_run_dir

DLNOTES = str(Path(sys.executable).with_name("dlnotes"))
MLP_FLAGS = ["--epochs", "4", "--limit-batches", "100", "--device", "cpu", "--batch-size", "32"]


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock column, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def start_and_interrupt(out: Path, signals: int = 1, signum: int = signal.SIGINT
                        ) -> tuple[subprocess.CompletedProcess, Path]:
    """Start a real mlp run, wait until its first epoch is checkpointed, then send `signum` at a random moment
    of the epochs after it."""
    process = subprocess.Popen([DLNOTES, "run", "mlp", *MLP_FLAGS, "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("mlp/*/checkpoints/last-*.pt")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))
    for _ in range(signals):
        process.send_signal(signum)
        time.sleep(0.01)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), latest_run(out, "mlp")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path: Path, signum: int) -> None:
    straight = subprocess.run([DLNOTES, "run", "mlp", *MLP_FLAGS, "--out", str(tmp_path / "a")],
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    reference = latest_run(tmp_path / "a", "mlp")

    stopped, run_dir = start_and_interrupt(tmp_path / "b", signum=signum)
    assert stopped.returncode == 128 + signum, stopped.stderr  # 130 after Ctrl-C, 143 after SIGTERM
    assert "Traceback" not in stopped.stderr
    assert f"dlnotes run mlp --resume {run_dir}" in stopped.stderr
    assert list((run_dir / "checkpoints").glob("last-*.pt"))
    assert not (run_dir / "checkpoint.pt").exists()  # the final model is written only when training ends

    resumed = subprocess.run([DLNOTES, "run", "mlp", "--resume", str(run_dir)], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert rows(run_dir) == rows(reference)  # every epoch's losses and accuracy, exactly
    for name, tensor in weights(reference).items():
        torch.testing.assert_close(weights(run_dir)[name], tensor)
    assert json.loads((run_dir / "config.json").read_text())["resumed"]


def test_second_ctrl_c_exits_at_once_without_corrupt_files(tmp_path: Path) -> None:
    stopped, run_dir = start_and_interrupt(tmp_path, signals=2)
    assert stopped.returncode == 130
    assert "Traceback" not in stopped.stderr
    assert not list(run_dir.rglob("*.tmp"))
    for path in (run_dir / "checkpoints").glob("*.pt") if (run_dir / "checkpoints").is_dir() else []:
        torch.load(path, weights_only=True)  # whatever was written is whole


def test_resume_may_extend_epochs_and_records_it(smoke_run, out_dir: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["run", "mlp", "--epochs", "1", "--limit-batches", "5", "--device", "cpu",
                                "--out", str(out_dir)])
    assert first.exit_code == 0, first.output
    run_dir = latest_run(out_dir, "mlp")
    more = runner.invoke(app, ["run", "mlp", "--resume", str(run_dir), "--epochs", "2"])
    assert more.exit_code == 0, more.output
    assert [r["epoch"] for r in rows(run_dir)] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["resumed"][0]["changed"]["epochs"] == [1, 2]


def test_periodic_checkpoints_keep_the_newest_k_and_the_best(out_dir: Path) -> None:
    result = CliRunner().invoke(app, ["run", "mlp", "--epochs", "2", "--limit-batches", "5", "--device", "cpu",
                                      "--save-every", "2", "--keep", "2", "--out", str(out_dir)])
    assert result.exit_code == 0, result.output
    folder = latest_run(out_dir, "mlp") / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last-00000008.pt", "last-00000010.pt"]
    best = torch.load(folder / "best.pt", weights_only=True)
    assert best["best"] == max(r["test_acc"] for r in rows(folder.parent))


def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(out_dir: Path) -> None:
    result = CliRunner().invoke(app, ["run", "mlp", "--lr", "1e12", "--save-every", "1", "--device", "cpu",
                                      "--out", str(out_dir)])
    assert result.exit_code == 3, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: loss became") and "at step" in message
    assert "Last good checkpoint" in message and "lower learning rate" in message
    good = Path(message.split("Last good checkpoint: ")[1].split(". Try")[0])
    state = torch.load(good, weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.parametrize("args, fragment", [
    (["run", "cnn-mnist", "--resume", "{run}"], "is a run of 'mlp', not 'cnn-mnist'"),
    (["run", "mlp", "--resume", "{run}", "--hidden", "32"], "--hidden cannot change"),
    (["run", "mlp", "--resume", "{run}", "--lr", "1"], "only --epochs, --total-steps, --device, --out can"),
    (["run", "mlp", "--resume", "{empty}"], "not a run directory"),
])
def test_resume_errors(args: list[str], fragment: str, out_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    runner.invoke(app, ["run", "mlp", "--smoke", "--device", "cpu", "--out", str(out_dir)])
    run_dir = latest_run(out_dir, "mlp")
    result = runner.invoke(app, [a.format(run=run_dir, empty=tmp_path) for a in args])
    assert result.exit_code == 2 and fragment in result.output, result.output


def test_checkpoint_of_another_model_version_is_a_clear_error(out_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    runner.invoke(app, ["run", "mlp", "--smoke", "--device", "cpu", "--out", str(out_dir)])
    run_dir = latest_run(out_dir, "mlp")
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["config"]["hidden"] = 32  # as if an older version of the recipe had a narrower layer
    torch.save(state, run_dir / "checkpoint.pt")
    image = tmp_path / "blank.png"
    from PIL import Image

    Image.new("L", (28, 28)).save(image)
    result = runner.invoke(app, ["predict", "mlp", "--run", str(run_dir), str(image)])
    assert result.exit_code == 2 and "does not fit this model" in result.output, result.output


def test_a_new_run_never_reuses_a_directory(tmp_path: Path) -> None:
    first, second = new_run_dir(tmp_path, "mlp"), new_run_dir(tmp_path, "mlp")
    assert first != second and first.is_dir() and second.is_dir()




def test_dqn_resumes_with_its_replay_buffer_and_a_larger_step_budget(out_dir: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["run", "dqn", "--smoke", "--device", "cpu", "--out", str(out_dir)])
    assert first.exit_code == 0, first.output
    run_dir = latest_run(out_dir, "dqn")
    saved = torch.load(sorted((run_dir / "checkpoints").glob("last-*.pt"))[-1], weights_only=True)
    assert saved["position"]["step"] == 300 and len(saved["extra"]["buffer"]["obs"]) == 300
    more = runner.invoke(app, ["run", "dqn", "--resume", str(run_dir), "--total-steps", "450"])
    assert more.exit_code == 0, more.output
    assert "resuming" in more.output and json.loads((run_dir / "summary.json").read_text())["metrics"][
        "env_steps"] == 450
    evaluations = [r["step"] for r in rows(run_dir) if "eval_return" in r]
    assert evaluations == [150, 300, 450]


def test_bert_resumes_through_the_trainers_own_checkpoints(out_dir: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["run", "bert-finetune", "--smoke", "--save-every", "4", "--keep", "2",
                                "--device", "cpu", "--out", str(out_dir)])
    assert first.exit_code == 0, first.output
    run_dir = latest_run(out_dir, "bert-finetune")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    more = runner.invoke(app, ["run", "bert-finetune", "--resume", str(run_dir), "--epochs", "2"])
    assert more.exit_code == 0, more.output
    steps = [r["step"] for r in rows(run_dir) if "train_loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # continued from step 8, nothing logged twice
    assert json.loads((run_dir / "config.json").read_text())["resumed"][0]["from"] == "checkpoint-8"


def test_seq2seq_resumes_and_trains_on(out_dir: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["run", "seq2seq", "--smoke", "--epochs", "5", "--device", "cpu", "--out", str(out_dir)])
    assert first.exit_code == 0, first.output
    run_dir = latest_run(out_dir, "seq2seq")
    more = runner.invoke(app, ["run", "seq2seq", "--resume", str(run_dir), "--epochs", "8"])
    assert more.exit_code == 0, more.output
    assert [r["epoch"] for r in rows(run_dir)] == list(range(1, 9))


# --- in-process: main(cfg) with the launch options in a context, as the CLI gives them --------------------------


def mlp_config(out: Path):
    from dlnotes import catalog

    info = catalog.get("mlp")
    module = catalog.load_module(info)
    values = catalog.config_values(info, epochs=2, limit_batches=10, batch_size=32, device="cpu", out=str(out))
    return module, module.Config(**values)


def test_main_interrupted_and_resumed_in_process_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """The same exact-resume promise as the subprocess test, without a subprocess: a Ctrl-C sent to this very
    process from inside step 13 (epoch 2, batch 3), then `main(cfg)` again under `options.using(--resume)`."""

    from dlnotes import options
    from dlnotes.errors import TrainingInterrupted

    mlp, cfg = mlp_config(tmp_path / "a")
    mlp.main(cfg)
    reference = latest_run(tmp_path / "a", "mlp")

    _, cfg = mlp_config(tmp_path / "b")
    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_after_update(13):  # handled by the Run: a stop request at this step's boundary
        with pytest.raises(TrainingInterrupted, match="Interrupted at step 13"):
            mlp.main(cfg)
    run_dir = latest_run(tmp_path / "b", "mlp")
    assert [p.name for p in (run_dir / "checkpoints").glob("last-*.pt")] == ["last-00000013.pt"]
    assert signal.getsignal(signal.SIGINT) is before  # the Run gave Ctrl-C back to whoever had it

    with options.using(options.RunOptions(resume=str(run_dir))):
        mlp.main(cfg)
    assert options.current_launch().options.resume == ""  # the options ended with the block
    assert rows(run_dir) == rows(reference)
    for name, tensor in weights(reference).items():
        torch.testing.assert_close(weights(run_dir)[name], tensor, rtol=0, atol=0)
    assert json.loads((run_dir / "config.json").read_text())["resumed"][0]["from"] == "last-00000013.pt"


def test_run_takes_the_target_from_the_launchers_catalog_entry(tmp_path: Path, monkeypatch) -> None:
    """Run does not parse the recipe file again: the launcher's entry (or the catalog's) has the TARGET."""
    from dataclasses import replace

    from dlnotes import catalog, options, tracking

    def refuse(path):
        raise AssertionError(f"read {path} again")

    monkeypatch.setattr(tracking, "read_targets", refuse)
    info = catalog.get("mlp")
    mlp, cfg = mlp_config(tmp_path)
    assert tracking.Run(mlp.__file__, cfg).target == info.target  # from the catalog, read once per process
    launched = replace(info, target=catalog.Target("test_loss", 0.5, "<="))
    with options.using(options.RunOptions(), recipe=launched):
        assert tracking.Run(mlp.__file__, cfg).target == launched.target


def test_tracking_does_not_import_the_command_line_layer() -> None:
    code = "import sys, dlnotes.tracking; print(sorted(m for m in sys.modules if m in ('click', 'dlnotes.flags')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


# --- durable writes ------------------------------------------------------------------------------------------------


def files_that_fail_half_way(monkeypatch, error: BaseException) -> None:
    """Every durable write from now on writes half of its bytes, then `error` happens (a full disk, a Ctrl-C)."""
    import os

    from dlnotes import durable

    class HalfWay:
        def __init__(self, file):
            self._file = file

        def write(self, data) -> int:
            self._file.write(bytes(data)[: len(data) // 2])
            raise error

        def __getattr__(self, name):
            return getattr(self._file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

    real_fdopen = os.fdopen
    monkeypatch.setattr(durable.os, "fdopen", lambda fd, mode: HalfWay(real_fdopen(fd, mode)))


def test_a_save_interrupted_half_way_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """A second Ctrl-C landing inside a checkpoint's write (issue 12: last-00000127.pt.tmp was left behind)."""
    from dlnotes.checkpoint import atomic_save

    path = tmp_path / "last-00000127.pt"
    atomic_save({"model": {"w": torch.ones(3)}}, path)
    with monkeypatch.context() as patch:
        files_that_fail_half_way(patch, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            atomic_save({"model": {"w": torch.zeros(3)}}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    torch.testing.assert_close(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))


def test_a_full_disk_while_training_is_one_line_naming_the_last_good_checkpoint(tmp_path: Path, monkeypatch,
                                                                                 invoke) -> None:
    """ENOSPC during the save after the first checkpoint (here best.pt): one error line, exit 2, the checkpoint
    before it named and whole, no temporary file anywhere in the run."""
    import errno

    from dlnotes import training_state

    real_save, full = training_state.TrainingState.save, []

    def second_save_hits_a_full_disk(self, run_dir, *args, **kwargs):
        if list((run_dir / "checkpoints").glob("last-*.pt")) and not full:
            full.append(True)
            files_that_fail_half_way(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
        return real_save(self, run_dir, *args, **kwargs)

    monkeypatch.setattr(training_state.TrainingState, "save", second_save_hits_a_full_disk)
    result = invoke("run", "mlp", "--epochs", "3", "--limit-batches", "3", "--device", "cpu", "--out", tmp_path)
    run_dir = latest_run(tmp_path, "mlp")
    good = run_dir / "checkpoints" / "last-00000003.pt"
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], result.output
    assert f"Last good checkpoint: {good}" in errors[0]
    assert not list(run_dir.rglob("*.tmp")) and sorted((run_dir / "checkpoints").iterdir()) == [good]
    torch.load(good, weights_only=True)  # whole


def test_durable_text_writes_keep_the_old_file_on_error_and_ordinary_permissions(tmp_path: Path) -> None:
    import os

    from dlnotes.durable import write_durably, write_text_durably

    path = tmp_path / "config.json"
    write_text_durably(path, '{"a": 1}')
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert path.stat().st_mode == plain.stat().st_mode  # not mkstemp's private 0600

    def fail_half_way(file):
        file.write(b'{"a": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match=f"Cannot write {path}: No space left on device"):
        write_durably(path, fail_half_way)
    assert path.read_text() == '{"a": 1}'
    assert sorted(os.listdir(tmp_path)) == ["config.json", "plain.json"]


def test_a_stop_signal_at_any_line_of_a_durable_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A signal handler's exception can surface at any line of Python (the loop caught it once: mkstemp had
    created the file, and was interrupted before it returned the name). Raise KeyboardInterrupt at the 1st,
    2nd, ... line that any Python frame runs during write_durably, until a write runs to its end: each time, the
    file is the old or the new version, whole, and no temporary file is left."""
    import os
    import sys

    from dlnotes.durable import write_durably, write_text_durably

    path = tmp_path / "summary.json"
    write_text_durably(path, "old")

    def write_new(file):
        file.write(b"new")

    interrupted_at = 0
    while True:
        interrupted_at += 1
        lines = 0

        def tracer(frame, event, arg, at=interrupted_at):
            nonlocal lines
            if event == "line":
                lines += 1
                if lines == at:
                    raise KeyboardInterrupt
            return tracer

        sys.settrace(tracer)
        try:
            write_durably(path, write_new)
            finished = True
        except KeyboardInterrupt:
            finished = False
        finally:
            sys.settrace(None)
        assert os.listdir(tmp_path) == ["summary.json"], f"after an interrupt at line {interrupted_at}"
        assert path.read_text() in ("old", "new")
        if finished:
            break
        path.write_text("old")
    assert interrupted_at > 5 and path.read_text() == "new"


# --- one run directory, one process ------------------------------------------------------------------------------


def test_a_second_resume_of_a_run_in_use_is_refused_naming_the_holder(out_dir: Path, smoke_run, invoke) -> None:
    _, run_dir = smoke_run("mlp")
    lock = run_dir / ".lock"
    assert not lock.exists()  # a finished run holds no lock
    lock.write_text("1\n")  # pid 1 is always alive: as if another dlnotes were resuming this run
    assert_one_line_error(invoke("run", "mlp", "--resume", run_dir), "in use by process 1")
    assert lock.read_text() == "1\n"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(gone.stdout)  # a lock whose process is gone is taken over
    result = invoke("run", "mlp", "--resume", run_dir, "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert not lock.exists()


def test_resume_of_a_run_with_a_truncated_config_is_one_line(out_dir: Path, smoke_run, invoke) -> None:
    _, run_dir = smoke_run("mlp")
    config = run_dir / "config.json"
    config.write_text(config.read_text()[:40])
    assert_one_line_error(invoke("run", "mlp", "--resume", run_dir), "config.json is unreadable")
