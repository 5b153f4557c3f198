"""Test session setup: the network is blocked (offline is proven, not hoped), runs go to temp dirs."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# Idle OpenMP threads spin by default; on a busy machine they steal the core their partner needs, and small
# steps (a tiny BERT's) take many times longer. Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# pytest-xdist runs the suite in one process per core (`-n auto` in pyproject.toml): each gets its share of the
# cores, as the --nproc launcher gives each worker, instead of every process fighting for all of them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
os.environ["HF_HUB_OFFLINE"] = "1"  # transformers/datasets must never try the hub
os.environ["HF_DATASETS_OFFLINE"] = "1"

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_local(address: object) -> bool:
    if isinstance(address, tuple) and address:
        host = str(address[0])
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
    return True  # AF_UNIX paths are local


def _guarded(real):
    def connect(sock: socket.socket, address: object, *args: object):
        if not _is_local(address):
            raise ConnectionRefusedError(f"network blocked in tests: {address}")
        return real(sock, address, *args)

    return connect


@pytest.fixture(autouse=True, scope="session")
def block_network():
    """Any connection to a non-loopback address fails, in every test."""
    socket.socket.connect = _guarded(_real_connect)
    socket.socket.connect_ex = _guarded(_real_connect_ex)
    yield
    socket.socket.connect = _real_connect
    socket.socket.connect_ex = _real_connect_ex


@pytest.fixture(autouse=True)
def _signal_handlers_as_they_were():
    """Each test starts with the stop-signal handlers pytest began with, and a test whose Run still holds a signal
    when it ends fails: a Run releases them when it finishes, stops, or its launch ends. (Lightning's Ctrl-C
    handling sets SIG_IGN in-process; that, not being ours, is only put back.)"""
    import signal

    from dlnotes.interrupts import StopRequests

    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    leaked = []
    for signum, handler in kept.items():
        now = signal.getsignal(signum)
        if now is not handler and handler is not None:
            signal.signal(signum, handler)
            if isinstance(getattr(now, "__self__", None), StopRequests):
                leaked.append(signal.Signals(signum).name)
    assert not leaked, f"a Run left its handler for {', '.join(leaked)} behind"


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """Where a test's runs go; also the working directory, so nothing lands in the repo."""
    out = tmp_path / "runs"
    out.mkdir()
    return out


@pytest.fixture(autouse=True)
def _cwd_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def smoke_run(out_dir: Path):
    """Run a recipe's main() in-process with its SMOKE settings (plus overrides) on the CPU.
    Returns (metrics, run directory)."""
    from dlnotes import catalog, options
    from dlnotes.tracking import latest_run

    def run(recipe: str, **overrides: object) -> tuple[dict[str, float], Path]:
        info = catalog.get(recipe)
        module = catalog.load_module(info)
        values = catalog.config_values(info, smoke=True, device="cpu", out=str(out_dir))
        with options.using(options.current_launch().options, recipe=info):  # as `dlnotes run` launches it
            metrics = module.main(module.Config(**(values | overrides)))  # a misspelt override fails here
        return metrics, latest_run(out_dir, info.id) if info.field("out") else out_dir

    return run


@pytest.fixture(scope="session")
def invoke():
    """The `dlnotes` CLI in-process through Typer's runner: `invoke("run", "mlp", "--out", tmp_path)` (paths and
    numbers become strings); `env={...}` sets environment variables for that call only."""
    from typer.testing import CliRunner

    from dlnotes.cli import app

    runner = CliRunner()

    def run(*args: object, env: dict[str, str] | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env)

    return run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` run only where a CUDA GPU is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def assert_one_line_error(result, *fragments: str, code: int = 2) -> None:
    """A user error as the CLI must report it: exit `code`, no traceback, one `error:` line naming the problem
    (other output may only be `note:` lines)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@contextlib.contextmanager
def ctrl_c_after_update(n: int):
    """A real SIGINT to this process right after the n-th `Run.update` (the n-th training step), handled by the
    Run as a user's Ctrl-C: a stop request at that step's boundary. Run.update is itself again afterwards."""
    import signal

    from dlnotes.tracking import Run

    calls, update = 0, Run.update

    def update_then_ctrl_c(self, samples, **values):
        nonlocal calls
        update(self, samples, **values)
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGINT)

    Run.update = update_then_ctrl_c
    try:
        yield
    finally:
        Run.update = update
