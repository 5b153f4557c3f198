"""What crosses between ranks is data, not code; stop signals leave no process of a multi-process run behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from dlnotes import distributed
from dlnotes.launch import free_port

DLNOTES = str(Path(sys.executable).with_name("dlnotes"))
VALUE = {"run_dir": "runs/mlp/20261129-120000", "metrics": (0.25, 7, None, True, float("nan")),
         "predicted": torch.arange(6).reshape(2, 3), "logits": np.ones((2, 2), dtype=np.float32),
         "texts": ["a", "ü"], "empty": []}


def _broadcast_in_group(rank: int, port: int, results: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    # Pickles must never travel: the old way (broadcast_object_list) unpickled whatever arrived.
    torch.distributed.broadcast_object_list = None
    received = distributed.broadcast(VALUE if rank == 0 else None)
    torch.save({"received": received}, Path(results) / f"{rank}.pt")
    torch.distributed.destroy_process_group()


def test_broadcast_sends_nested_results_without_pickle(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_broadcast_in_group, args=(free_port(), str(tmp_path)), nprocs=2)
    got = torch.load(tmp_path / "1.pt", weights_only=False)["received"]
    assert got["run_dir"] == VALUE["run_dir"] and got["texts"] == ["a", "ü"] and got["empty"] == []
    assert got["metrics"][:4] == (0.25, 7, None, True) and np.isnan(got["metrics"][4])
    assert torch.equal(got["predicted"], VALUE["predicted"])
    assert isinstance(got["logits"], np.ndarray) and np.array_equal(got["logits"], VALUE["logits"])


def test_broadcast_refuses_what_is_not_data() -> None:
    with pytest.raises(TypeError, match="cannot send"):
        distributed._encode(object(), [])


def _wait_for_training(process: subprocess.Popen, out: Path, deadline: float) -> None:
    """Until rank 0 has logged a row: the run directory's metrics.jsonl exists from the moment the Run is made,
    but stop signals are watched only from `run.attach` on, and a signal before that quits at once ("error:
    interrupted.", exit 130) by design; a row is written inside the training loop, after every rank attached."""
    while not any(path.stat().st_size for path in out.glob("mlp/*/metrics.jsonl")):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, "second-ctrl-c"])
def test_a_stop_signal_to_the_launcher_leaves_no_process_behind(tmp_path: Path, signum) -> None:
    stderr_file = tmp_path / "stderr.txt"
    with stderr_file.open("w") as stderr:
        process = subprocess.Popen([DLNOTES, "run", "mlp", "--epochs", "50", "--nproc", "2", "--device", "cpu",
                                    "--out", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    _wait_for_training(process, tmp_path, time.time() + 180)
    launcher = psutil.Process(process.pid)
    family = launcher.children(recursive=True)
    assert len(family) >= 3  # torchrun and its two workers
    if signum == "second-ctrl-c":
        process.send_signal(signal.SIGINT)
        # The second only once the first has reached the workers: two signals sent back to back can arrive as
        # one (a pending signal is not queued twice), and this test is about the second one.
        deadline = time.time() + 60
        while "Ctrl-C: stopping" not in stderr_file.read_text():
            assert process.poll() is None and time.time() < deadline, stderr_file.read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
    else:
        process.send_signal(signum)
    process.wait(timeout=120)
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    assert process.returncode == {signal.SIGTERM: 143, signal.SIGHUP: 129}.get(signum, 130)


def test_a_worker_that_dies_ends_the_job_with_one_line(tmp_path: Path) -> None:
    process = subprocess.Popen([DLNOTES, "run", "mlp", "--epochs", "50", "--nproc", "2", "--device", "cpu",
                                "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_training(process, tmp_path, time.time() + 180)
    family = psutil.Process(process.pid).children(recursive=True)
    worker = next(p for p in family if "RANK" in p.environ() and p.environ()["RANK"] == "1")
    worker.kill()
    _, stderr = process.communicate(timeout=120)  # not the 30-minute collective timeout
    assert process.returncode != 0
    # rank 0 may say first that it lost contact (if it noticed before being stopped); the last line says why
    assert stderr.strip().splitlines()[-1] == ("error: worker rank 1 was killed by signal SIGKILL; the job stopped "
                                               "(its own output above says why)."), stderr
    assert "Traceback" not in stderr
    assert not psutil.wait_procs(family, timeout=10)[1]


def test_an_unreachable_rendezvous_endpoint_is_one_line(tmp_path: Path) -> None:
    env = os.environ | {"DLNOTES_RENDEZVOUS_TIMEOUT_S": "3"}
    result = subprocess.run([DLNOTES, "run", "mlp", "--epochs", "1", "--device", "cpu", "--nnodes", "2",
                             "--node-rank", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr  # one line, no C++ log
    assert result.stderr.startswith("error: the processes could not meet at the rendezvous endpoint within 3 s")


SLOW_SAVES = """
import os
if "RANK" in os.environ:  # torchrun's workers only: every training-state checkpoint takes SLOW_SAVE_S longer
    import time
    from dlnotes import checkpoint
    real_atomic_save = checkpoint.atomic_save
    def slow_atomic_save(state, path):
        time.sleep(float(os.environ["SLOW_SAVE_S"]))
        return real_atomic_save(state, path)
    checkpoint.atomic_save = slow_atomic_save
"""


@pytest.mark.parametrize("grace", [60, 2])
def test_workers_get_the_shutdown_grace_to_write_their_checkpoint(tmp_path: Path, grace: int) -> None:
    """SIGTERM to the launcher: with enough grace the workers finish a slow checkpoint and exit 143; with too
    little, torchrun kills them mid-save (so the grace, 300 s by default instead of torchrun's 30, is what matters),
    and still nothing is left running."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_SAVES)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
                        "SLOW_SAVE_S": "6", "DLNOTES_SHUTDOWN_GRACE_S": str(grace)}
    process = subprocess.Popen([DLNOTES, "run", "mlp", "--epochs", "50", "--nproc", "2", "--device", "cpu",
                                "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    _wait_for_training(process, tmp_path, time.time() + 180)
    family = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 143
    assert not psutil.wait_procs(family, timeout=10)[1]
    if grace == 60:
        assert "Interrupted at step" in stderr and "--resume" in stderr, stderr
    else:
        assert "Interrupted at step" not in stderr, stderr
