"""Data-parallel training under torchrun on this CPU: gloo, 2 processes, and 2 "nodes" on loopback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from typer.testing import CliRunner

from dlnotes import distributed
from dlnotes.cli import app
from dlnotes.launch import free_port, strip_launch_flags

DLNOTES = str(Path(sys.executable).with_name("dlnotes"))
TINY_CNN = ["--epochs", "1", "--limit-batches", "4", "--device", "cpu"]
runner = CliRunner()


def one_run(out: Path, recipe: str) -> Path:
    runs = list((out / recipe).iterdir())
    assert len(runs) == 1, runs  # rank 0 alone made a directory
    return runs[0]


def assert_written_once(run_dir: Path, world_size: int) -> dict:
    """One metrics row per epoch (not one per rank), a checkpoint, and replicas that ended identical."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == world_size
    assert summary["replica_max_difference"] == 0.0  # DDP kept every process's weights equal, bit for bit
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "samples.png").is_file()
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    return summary


def test_two_processes_with_gloo_train_cnn_mnist_and_write_once(tmp_path: Path) -> None:
    result = subprocess.run([DLNOTES, "run", "cnn-mnist", *TINY_CNN, "--nproc", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("cnn-mnist finished") == 1  # rank 1 prints nothing
    assert "processes: 2" in result.stdout
    assert_written_once(one_run(tmp_path, "cnn-mnist"), world_size=2)


def test_two_nodes_on_loopback_train_as_one_job(tmp_path: Path) -> None:
    port = free_port()
    nodes = [subprocess.Popen([DLNOTES, "run", "cnn-mnist", *TINY_CNN, "--nnodes", "2", "--node-rank", str(rank),
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--out", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "node 1 of 2" in outputs[1][0] and "finished" not in outputs[1][0]
    assert_written_once(one_run(tmp_path, "cnn-mnist"), world_size=2)


def test_two_processes_take_the_same_steps_as_one_with_the_same_global_batch(tmp_path: Path) -> None:
    # No dropout, no augmentation: then the only randomness is the batch order, which every rank shares.
    flags = ["--epochs", "1", "--limit-batches", "30", "--no-augment", "--dropout", "0", "--device", "cpu"]
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        result = subprocess.run([DLNOTES, "run", "mlp", *flags, *extra, "--out", str(tmp_path / name)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    single, double = (torch.load(one_run(tmp_path / n, "mlp") / "checkpoint.pt", weights_only=True)
                      for n in ("one", "two"))
    for key, tensor in single["model"].items():
        torch.testing.assert_close(double["model"][key], tensor, atol=1e-6, rtol=1e-5)  # only summation order differs


def test_ctrl_c_stops_every_process_at_the_same_step_and_checkpoints_once(tmp_path: Path) -> None:
    process = subprocess.Popen([DLNOTES, "run", "mlp", "--epochs", "20", "--nproc", "2", "--device", "cpu",
                                "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("mlp/*/checkpoints/last-*.pt")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.count("Interrupted at step") == 1  # said once, by rank 0
    run_dir = one_run(tmp_path, "mlp")
    assert f"dlnotes run mlp --resume {run_dir}" in stderr
    assert not (run_dir / "checkpoint.pt").exists()


# --- the pieces, in-process ---------------------------------------------------------------------------------


def test_shards_of_a_batch_cover_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = torch.arange(53)
    monkeypatch.setenv("WORLD_SIZE", "2")
    pieces = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        pieces.append(distributed.shard(batch))
    assert [len(p) for p in pieces] == [26, 27]
    assert torch.equal(torch.cat(pieces), batch)


def test_workers_get_the_command_without_the_launch_flags() -> None:
    args = ["--epochs", "2", "--nproc", "2", "--nnodes=1", "--node-rank", "0", "--rdzv-endpoint", "h:1", "--smoke"]
    assert strip_launch_flags(args) == ["--epochs", "2", "--smoke"]


# --- bad input --------------------------------------------------------------------------------------------


def run_cli(*args: object):
    return runner.invoke(app, ["run", *map(str, args)])


def test_nproc_below_one_is_refused() -> None:
    assert_one_line_error(run_cli("mlp", "--nproc", "0"), "--nproc")


def test_more_processes_than_cores_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert_one_line_error(run_cli("mlp", "--device", "cpu", "--nproc", "3"), "--nproc 3", "2 CPU cores")


def test_a_rendezvous_port_in_use_is_refused() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("mlp", "--device", "cpu", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}")
    assert_one_line_error(result, f"Port {port}", "in use")


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--nnodes", "2"], "--rdzv-endpoint"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29999"], "--node-rank 2"),
    (["--nnodes", "2", "--rdzv-endpoint", "nohost"], "HOST:PORT"),
])
def test_inconsistent_multi_node_flags_are_refused(flags: list[str], fragment: str) -> None:
    assert_one_line_error(run_cli("mlp", "--device", "cpu", *flags), fragment)


def test_a_recipe_without_distributed_support_says_so() -> None:
    assert_one_line_error(run_cli("dqn", "--nproc", "2"), "does not support distributed")


def test_fp16_on_cpu_is_refused(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("cnn-mnist", "--smoke", "--device", "cpu", "--precision", "fp16", "--out", tmp_path),
                          "fp16 needs a CUDA GPU")


def test_unknown_precision_is_refused(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("mlp", "--smoke", "--device", "cpu", "--precision", "fp8", "--out", tmp_path),
                          "Unknown precision 'fp8'")


def test_compile_without_a_compiler_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert_one_line_error(run_cli("mlp", "--smoke", "--device", "cpu", "--compile", "--out", tmp_path),
                          "--compile", "C++ compiler")


def test_bert_finetune_trains_with_two_processes_through_the_trainer(tmp_path: Path) -> None:
    result = subprocess.run([DLNOTES, "run", "bert-finetune", "--smoke", "--device", "cpu", "--nproc", "2",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run_dir = one_run(tmp_path, "bert-finetune")
    summary = json.loads((run_dir / "summary.json").read_text())
    # A 2-class loss near ln 2 = 0.69, as in one process: the Trainer must not scale it by the process count.
    assert summary["metrics"]["train_loss"] < 0.75 and summary["metrics"]["test_loss"] < 0.75
    assert (run_dir / "model" / "config.json").is_file()
    assert result.stdout.count("bert-finetune finished") == 1


@pytest.mark.parametrize("recipe", ["fasttext", "seq2seq"])
def test_text_recipes_train_with_two_processes_and_stay_in_sync(tmp_path: Path, recipe: str) -> None:
    result = subprocess.run([DLNOTES, "run", recipe, "--smoke", "--device", "cpu", "--nproc", "2",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((one_run(tmp_path, recipe) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replica_max_difference"] == 0.0
    assert result.stdout.count(f"{recipe} finished") == 1


# --- on a GPU (skipped here) ----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_cnn_on_cuda(smoke_run, precision: str) -> None:
    metrics, run_dir = smoke_run("cnn-mnist", device="cuda", precision=precision, epochs=2, limit_batches=25)
    assert metrics["test_acc"] > 0.5
    assert json.loads((run_dir / "config.json").read_text())["config"]["precision"] == precision


@pytest.mark.cuda
def test_compiled_cnn_trains_on_cuda(tmp_path: Path) -> None:
    result = subprocess.run([DLNOTES, "run", "cnn-mnist", "--epochs", "1", "--limit-batches", "4", "--device", "cuda",
                             "--compile", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
