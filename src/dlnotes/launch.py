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
from dlnotes.catalog import RecipeInfo, load_module, read_recipe
from dlnotes.errors import TrainingInterrupted, UserError
from dlnotes.flags import parse_args
from dlnotes.options import RESUMABLE_CHANGES, RunOptions, using
from dlnotes.runfiles import read_run_config


def quiet_idle_threads() -> None:
    """Idle OpenMP threads sleep instead of spinning (set before torch is imported). On a 2-core machine
    with anything else running, spinning threads steal their partner's core: seq2seq trained at 979 instead
    of 2,043 tokens/s, a tiny BERT step took 2 s instead of 60 ms. An explicit setting wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
    except KeyboardInterrupt:
        if distributed.is_main():
            print_error("interrupted.")
        return 130


# --- several processes: torchrun ---------------------------------------------------------------------------


def launch_torchrun(info: RecipeInfo, args: list[str], options: RunOptions, device: str,
                    module: ModuleType | None) -> int:
    """Run the same command under torchrun, without the launch flags; the workers see RANK/WORLD_SIZE and
    train with DistributedDataParallel. Returns torchrun's exit code (130 after Ctrl-C)."""
    check_process_count(options.nproc, device)
    endpoint = rendezvous_endpoint(options)
    worker_args = strip_launch_flags(args)
    target = [module.__file__, *worker_args] if module is not None and module.__file__ else \
        ["-m", "dlnotes", "run", info.id, *worker_args]
    command = [sys.executable, "-c", "from dlnotes.launch import torchrun; torchrun()", f"--nnodes={options.nnodes}",
               f"--nproc-per-node={options.nproc}", f"--node-rank={options.node_rank}",
               "--rdzv-backend=static", f"--rdzv-endpoint={endpoint}", "--max-restarts=0", *target]
    # Each process gets its share of the cores: N processes x all cores each would fight over them.
    threads = str(max(1, (os.cpu_count() or 1) // options.nproc))
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    print(f"torchrun: {options.nproc} process(es) on node {options.node_rank} of {options.nnodes}, "
          f"rendezvous at {endpoint}", flush=True)
    # torchrun gets its own process group, so a Ctrl-C reaches the workers once (forwarded by torchrun) and
    # they can finish the step and checkpoint; a terminal's Ctrl-C would otherwise hit them twice at once.
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    interrupts = 0

    def forward(signum: int, frame: Any) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            proc.send_signal(signal.SIGINT)
        else:  # the second Ctrl-C: stop everything now
            os.killpg(proc.pid, signal.SIGKILL)

    previous = signal.signal(signal.SIGINT, forward)
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return 130 if interrupts and code != 0 else code


def torchrun() -> None:
    """`python -m torch.distributed.run` with sys.argv, except that the Ctrl-C it forwards to the workers
    ends it with exit code 130 instead of a traceback, and its own log shows errors only."""
    import logging

    os.environ.setdefault("LOGLEVEL", "ERROR")  # read by some of torch.distributed.elastic's loggers on import
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # and the others inherit this

    try:
        main()
    except SignalException:
        sys.exit(130)


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
    """`python recipe.py --flags`: the same flags as `dlnotes run`, for a recipe file run or copied on its own."""
    module = sys.modules[main.__module__]
    path = Path(module.__file__ or sys.argv[0])
    sys.exit(execute(read_recipe(path), sys.argv[1:], prog=path.name, module=module))
