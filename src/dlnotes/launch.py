"""Running a recipe from command-line arguments, the same way from `dlnotes run ID` and `python recipe.py`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from dlnotes import distributed
from dlnotes.catalog import RecipeInfo, load_module, read_module
from dlnotes.errors import TrainingInterrupted, UserError
from dlnotes.options import RESUMABLE_CHANGES, RunOptions, using
from dlnotes.runfiles import read_run_config

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # how idle OpenMP threads wait; one set by the user wins
SPIN_COUNT = "10000"  # busy-wait rounds before an idle libgomp thread sleeps; its default is 300,000
SERVE_SPIN_COUNT = "300000"  # for a decoding step, whose Python between products is longer than 10,000 rounds
_chosen_here: set[str] = set()  # what quiet_idle_threads set (not the user): serving_idle_threads may undo it


def quiet_idle_threads(spin_count: str = SPIN_COUNT) -> None:
    """Choose how idle OpenMP threads wait, by what else the machine is running (before torch is imported).

    Measured on 2 cores (cnn-mnist, README "Measured"): alone on the machine, threads that sleep at once
    (OMP_WAIT_POLICY=PASSIVE) trained at ~5,000 samples/s against ~8,000 for threads that spin briefly, because
    each of a step's many small operations first has to wake its partner; beside another job, spinning threads
    hold the core the other job's thread needs (two runs at once: ~2,100 samples/s each spinning, ~3,700
    sleeping). So: sleep at once when another process is running, spin briefly when none is. An explicit
    OMP_WAIT_POLICY or GOMP_SPINCOUNT wins."""
    if any(name in os.environ for name in WAIT_VARIABLES):
        return
    name, value = ("OMP_WAIT_POLICY", "PASSIVE") if other_runnable_processes() > 0 else ("GOMP_SPINCOUNT", spin_count)
    os.environ[name] = value
    _chosen_here.add(name)


def serving_idle_threads() -> None:
    """For a process that serves a model (before torch is imported): its decoding threads spin for libgomp's
    default 300,000 rounds between the few hundred small products of a token, so that both cores decode; on a
    busy machine they sleep at once instead (and the decoder then uses one thread: `LlamaDecoder`). Numbers in
    the README's serve section. A setting the user made wins; one `quiet_idle_threads` made is replaced."""
    for name in _chosen_here:
        os.environ.pop(name, None)
    _chosen_here.clear()
    quiet_idle_threads(spin_count=SERVE_SPIN_COUNT)


def environment_choosing_its_own_wait() -> dict[str, str]:
    """This process's environment without the wait settings `quiet_idle_threads` chose here (a user's stay): for
    a child process that looks at the machine itself when it starts, and may serve (a bench worker)."""
    return {name: value for name, value in os.environ.items() if name not in _chosen_here}


def other_runnable_processes(samples: int = 5, interval_s: float = 0.01) -> float:
    """How many other processes want a core now: the median over a few samples of Linux's count of runnable
    tasks (/proc/loadavg's fourth field), less this one. The load average itself lags by a minute, long enough
    to count a run that just ended. Where there is no /proc (macOS, Windows), assume busy: sleeping threads
    cost some speed, spinning ones beside another job cost much more."""
    import statistics
    import time

    counts = []
    for i in range(samples):
        try:
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            return 1.0
        if i < samples - 1:
            time.sleep(interval_s)
    return statistics.median(counts)


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def build_config(module: ModuleType, values: dict[str, Any]) -> Any:
    try:
        return module.Config(**values)
    except TypeError as err:  # a field the Config does not have
        raise UserError(str(err)) from err


def resume_values(info: RecipeInfo, given: dict[str, Any], options: RunOptions) -> dict[str, Any]:
    """A resumed run keeps the flags it was started with; only RESUMABLE_CHANGES may be given anew."""
    saved = read_run_config(Path(options.resume), info.id)["config"]
    values = {f.name: saved.get(f.name, f.default) for f in info.fields}
    values.update({name: given[name] for name in options.explicit & set(RESUMABLE_CHANGES)})
    refused = sorted(options.explicit - set(RESUMABLE_CHANGES))
    if refused:
        flags = ", ".join("--" + name.replace("_", "-") for name in refused)
        allowed = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE_CHANGES)
        raise UserError(f"--resume keeps the run's flags; {flags} cannot change (only {allowed} can).")
    return values


def execute(info: RecipeInfo, args: list[str], prog: str, module: ModuleType | None = None) -> int:
    """Parse flags, build the Config, call the recipe's main. User errors become one line and exit code 2."""
    from dlnotes.flags import parse_args  # here, not at the top: click is not needed for `dlnotes list`

    try:
        parsed = parse_args(info, args, prog)
        if parsed is None:
            return 0
        values, options = parsed
        if options.resume:
            values = resume_values(info, values, options)
        if (options.nproc > 1 or options.nnodes > 1) and not distributed.in_worker():
            build_config(module or load_module(info), values)  # bad flags fail here, once, not in every worker
            return launch_torchrun(info, args, options, values.get("device", "cpu"), module)
        if not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 alone prints; errors still reach stderr
        module = module or load_module(info)
        finished = False
        try:
            with using(options, recipe=info):  # the Run made inside main() reads them; they end with this launch
                module.main(build_config(module, values))
            finished = True
        except TrainingInterrupted:
            finished = True  # every rank stopped after the same step
            raise
        finally:
            distributed.stop(finished)
        return 0
    except TrainingInterrupted as stop:
        if distributed.is_main():
            print(str(stop), file=sys.stderr)
        return stop.exit_code
    except UserError as err:
        print_error(str(err))
        return err.exit_code
    except KeyboardInterrupt as stop:  # a second stop signal (interrupts.StopNow), or Ctrl-C before training
        if distributed.is_main():
            print_error("interrupted.")
        return getattr(stop, "exit_code", 130)
    except RuntimeError as err:  # another rank died or hung: say so in one line; the launcher says which
        if not distributed.lost_contact(err):
            raise
        print_error(f"rank {distributed.rank()} lost contact with the other processes: "
                    f"{str(err).strip().splitlines()[0][:200]}")
        return 1


# --- several processes: torchrun ---------------------------------------------------------------------------


RENDEZVOUS_TIMEOUT_S = int(os.environ.get("DLNOTES_RENDEZVOUS_TIMEOUT_S", "60"))  # how long a node waits for the others
# How long a worker may take to checkpoint and exit after a stop signal before it is killed: torchrun's own
# default (30 s) is shorter than writing a large training state (fasttext's) to a slow disk.
SHUTDOWN_GRACE_S = int(os.environ.get("DLNOTES_SHUTDOWN_GRACE_S", "300"))
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}  # exit code 128 + signal number


def launch_torchrun(info: RecipeInfo, args: list[str], options: RunOptions, device: str,
                    module: ModuleType | None) -> int:
    """Run the same command under torchrun, without the launch flags; the workers see RANK/WORLD_SIZE and
    train with DistributedDataParallel. Returns torchrun's exit code, or 128 + the signal that stopped it.

    A first Ctrl-C, SIGTERM or SIGHUP is forwarded to torchrun, which passes it on to every worker: they
    finish the step, checkpoint and exit. A second one, or a grace period running out, kills torchrun and
    every worker: torchrun starts each worker in a session of its own, so a process-group kill would miss
    them; the launcher kills every process it started, found by walking the process tree."""
    check_process_count(options.nproc, device)
    endpoint = rendezvous_endpoint(options)
    worker_args = strip_launch_flags(args)
    target = [module.__file__, *worker_args] if module is not None and module.__file__ else \
        ["-m", "dlnotes", "run", info.id, *worker_args]
    command = [sys.executable, "-c", "from dlnotes.launch import torchrun; torchrun()", f"--nnodes={options.nnodes}",
               f"--nproc-per-node={options.nproc}", f"--node-rank={options.node_rank}",
               "--rdzv-backend=static", f"--rdzv-endpoint={endpoint}", f"--rdzv-conf=timeout={RENDEZVOUS_TIMEOUT_S}",
               f"--shutdown-timeout={SHUTDOWN_GRACE_S}", "--max-restarts=0", *target]
    # Each process gets its share of the cores: N processes x all cores each would fight over them.
    threads = str(max(1, (os.cpu_count() or 1) // options.nproc))
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    print(f"torchrun: {options.nproc} process(es) on node {options.node_rank} of {options.nnodes}, "
          f"rendezvous at {endpoint}", flush=True)
    # torchrun gets its own process group, so a Ctrl-C reaches the workers once (forwarded by torchrun) and
    # they can finish the step and checkpoint; a terminal's Ctrl-C would otherwise hit them twice at once.
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    started = ProcessTree(proc.pid)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) == 1:  # a hang-up asks the workers to checkpoint and stop, as SIGTERM does
            proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
        else:  # the second signal: stop everything now
            started.kill()

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        while True:
            started.refresh()  # the workers are not torchrun's process group: remember them while torchrun lives
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        started.kill()  # whatever torchrun left behind (a worker it could not stop) goes too
    return STOP_SIGNALS[received[0]] if received and code != 0 else code


class ProcessTree:
    """Every process descended from `pid` that was ever seen alive, so that all of them can be killed even after
    their parent is gone (an orphan is re-parented away from the tree and a later walk would miss it)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._psutil = psutil
        self._root = psutil.Process(pid)
        self._seen = {self._root}

    def refresh(self) -> None:
        try:
            self._seen.update(self._root.children(recursive=True))
        except self._psutil.NoSuchProcess:
            pass

    def kill(self) -> None:
        """SIGKILL every remembered process still running (psutil checks that a pid was not reused), and wait
        for the descendants to go. Not for the root: it is the caller's child, and psutil's wait would reap it,
        so the caller's own wait would find no child and report exit code 0 for a job that was killed."""
        self.refresh()
        alive = []
        for process in self._seen:
            try:
                process.kill()
                alive.append(process)
            except self._psutil.NoSuchProcess:
                continue
        self._psutil.wait_procs([p for p in alive if p != self._root], timeout=5)


def torchrun() -> None:
    """`python -m torch.distributed.run` with sys.argv, except that a stop signal it forwards to the workers
    ends it with exit code 128 + signal instead of a traceback, a failed worker is one line, and its own log
    shows errors only."""
    import logging

    os.environ.setdefault("LOGLEVEL", "ERROR")  # read by some of torch.distributed.elastic's loggers on import
    # The agent's C++ store client logs every failed connection attempt with a native stack trace; the one line
    # below says the same. Only this process is quietened: the workers get the environment as it was.
    quiet = "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    import torch  # noqa: F401 - the C++ log level is read once, when torch loads

    if quiet:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import main

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # and the others inherit this
    logging.getLogger("torch.distributed.elastic.multiprocessing.errors").setLevel(logging.CRITICAL)

    try:
        main()
    except SignalException as stop:
        sys.exit(STOP_SIGNALS.get(stop.sigval, 128 + int(stop.sigval)))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()  # the root cause; the others were stopped because of it
        how = (f"was killed by signal {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        print_error(f"worker rank {rank} {how}; the job stopped (its own output above says why).")
        sys.exit(failure.exitcode if 0 < failure.exitcode < 256 else 1)
    except (RendezvousError, TimeoutError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print_error(f"the processes could not meet at the rendezvous endpoint within {RENDEZVOUS_TIMEOUT_S} s "
                    f"(DLNOTES_RENDEZVOUS_TIMEOUT_S): {first}")
        sys.exit(1)


def check_process_count(nproc: int, device: str) -> None:
    """At most one process per GPU on CUDA, one per CPU core otherwise."""
    import torch

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise UserError(f"--nproc {nproc} needs {nproc} GPUs; this machine has {gpus}.")
        return
    cores = os.cpu_count() or 1
    if nproc > cores:
        raise UserError(f"--nproc {nproc} is more than this machine's {cores} CPU cores "
                        "(each process needs at least one).")


def rendezvous_endpoint(options: RunOptions) -> str:
    """HOST:PORT where the processes meet. Node 0 listens there, so its port must be free."""
    if options.nnodes > 1 and not options.rdzv_endpoint:
        raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address, the same on every node).")
    if options.node_rank >= options.nnodes:
        raise UserError(f"--node-rank {options.node_rank} must be below --nnodes {options.nnodes}.")
    if not options.rdzv_endpoint:
        return f"127.0.0.1:{free_port()}"
    host, _, port_text = options.rdzv_endpoint.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UserError(f"--rdzv-endpoint must be HOST:PORT, got '{options.rdzv_endpoint}'.")
    if options.node_rank == 0 and not port_is_free(int(port_text)):
        raise UserError(f"Port {port_text} of --rdzv-endpoint is in use; pick another port.")
    return options.rdzv_endpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def strip_launch_flags(args: list[str]) -> list[str]:
    """`args` without --nproc/--nnodes/--node-rank/--rdzv-endpoint (and their values): the workers' flags."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in distributed.LAUNCH_FLAGS:
            skip = True
        elif arg.split("=")[0] not in distributed.LAUNCH_FLAGS:
            kept.append(arg)
    return kept


def cli(config_class: type, main: Callable[[Any], dict[str, float]]) -> None:
    """`python recipe.py --flags`: the same flags as `dlnotes run`, for a recipe file run or copied on its own.
    The file is imported already, so its flags come from `config_class` itself (an edited copy may compute a
    default, `lr: float = 3e-3 / 2`)."""
    module = sys.modules[main.__module__]
    try:
        info = read_module(module, config_class)
    except UserError as err:
        print_error(str(err))
        sys.exit(err.exit_code)
    sys.exit(execute(info, sys.argv[1:], prog=info.path.name, module=module))
