"""Runs of other recipes that a recipe builds on: the newest one that met its target, or train one first.

A diffusion recipe is judged by a cnn-mnist classifier, fine-tuning is compared with a from-scratch run, a
fine-tuned model is served. Such a recipe asks for the run it needs and records which one it used:

    used = prior_runs.met_run_or_train("cnn-mnist", cfg.out, cfg.device)    # before Run(...): see below
    run = Run(__file__, cfg, device)
    run.record("cnn-mnist", used.as_record())     # config.json: {"cnn-mnist": {"run": ..., "trained_now": ...}}

`met_run_or_train` looks under the same `--out` folder (`OUT/ID/*/summary.json` with `target_met` true,
newest first; unfinished or unreadable runs are skipped). When there is none it trains the recipe with its
default Config in a child process, exactly as `python recipes/ID.py --out OUT --device DEVICE` would, and
checks again. A child process, not an in-process `main(cfg)`: the inner run must not see the outer launch's
options (an outer `--resume` would apply to it), share its Ctrl-C handler, draw a progress bar inside the
outer one, or leave torch's global state (seed, thread count, CUDA memory) changed behind it. Call it before
creating the outer Run, so that a Ctrl-C during the inner training stops the inner run cleanly (it saves a
checkpoint that can be resumed) and the outer one has nothing to save yet.

A run directory the user names (say `--judge-run DIR`) is checked with `given_run(DIR, "cnn-mnist", flag)`.
A reference run with other flags than the defaults (resnet trained on 100 labels, to compare with fine-tuning on
the same 100) comes from `run_with("resnet", out, device, train_labels=100)`: the newest finished run whose
config is the defaults plus those flags, met its target or not, else one trained now with them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlnotes import catalog, distributed
from dlnotes.errors import TrainingInterrupted, UserError

# torchrun's variables: a child started from a worker must train alone, not try to join the worker's group.
TORCHRUN_ENV = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                          "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"})


@dataclass(frozen=True)
class UsedRun:
    """A finished run of another recipe, and whether this call trained it."""

    recipe: str
    dir: Path
    metric: str | None  # the recipe's target metric (None for a recipe without a target)
    value: float | None
    target_met: bool | None
    trained_now: bool = False

    def as_record(self) -> dict[str, Any]:
        """What `run.record(recipe, ...)` writes to config.json."""
        return {"run": str(self.dir), "metric": self.metric, "value": self.value,
                "target_met": self.target_met, "trained_now": self.trained_now}

    @classmethod
    def from_record(cls, recipe: str, record: dict[str, Any]) -> UsedRun:
        return cls(recipe, Path(record["run"]), record["metric"], record["value"], record["target_met"],
                   record["trained_now"])


def finished_runs(out: str | Path, recipe: str) -> list[UsedRun]:
    """Runs of `recipe` under `out` that wrote a readable summary.json, newest first."""
    found = (read_finished(path.parent, recipe) for path in Path(out).glob(f"{recipe}/*/summary.json"))
    return sorted((used for used in found if used), key=lambda used: _run_order(used.dir), reverse=True)


def read_finished(run_dir: Path, recipe: str) -> UsedRun | None:
    """The run in `run_dir` as its summary.json describes it; None when it has none that is readable."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("recipe") != recipe:
            return None
        target = summary.get("target")
        metric = target[0] if target else None
        value = summary["metrics"].get(metric) if metric else None
        return UsedRun(recipe, run_dir, metric, None if value is None else float(value), summary.get("target_met"))
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None  # unfinished, half-written, hand-edited or from an older format: not a run to build on


def newest_met_run(out: str | Path, recipe: str) -> UsedRun | None:
    """The newest finished run of `recipe` under `out` whose summary says it met its target."""
    return next((used for used in finished_runs(out, recipe) if used.target_met is True), None)


def met_run_or_train(recipe: str, out: str | Path, device: str = "auto") -> UsedRun:
    """The newest run of `recipe` under `out` that met its target; when there is none, train one with the
    recipe's defaults first (in a child process, printing its progress), then check that it met its target.
    In a multi-process run, rank 0 finds or trains and the other ranks wait for its answer (call it after
    `distributed.start`; the others' wait is bounded by the process group's timeout)."""
    if distributed.world_size() > 1 and not distributed.active():
        raise RuntimeError("met_run_or_train in a multi-process run: call it after distributed.start()")
    if not distributed.is_main():
        record = distributed.broadcast(None)
        if "error" in record:  # rank 0 failed: every rank stops with its message
            raise (TrainingInterrupted if record["interrupted"] else UserError)(record["error"])
        return UsedRun.from_record(recipe, record)
    try:
        used = newest_met_run(out, recipe) or _train_with_defaults(recipe, Path(out), device)
    except UserError as err:
        distributed.broadcast({"error": str(err), "interrupted": isinstance(err, TrainingInterrupted)})
        raise
    distributed.broadcast(used.as_record())  # plain JSON travels between ranks
    return used


def run_with(recipe: str, out: str | Path, device: str = "auto", **flags: Any) -> UsedRun:
    """The newest finished run of `recipe` under `out` whose config is its defaults with `flags` (device, out and
    seed aside), whether it met its target or not; when there is none, train one with them first, as
    `python recipes/ID.py --out OUT --device DEVICE --train-labels 100` would. For a single-process caller."""
    info = catalog.get(recipe)
    unknown = [name for name in flags if info.field(name) is None]
    if unknown:
        raise UserError(f"Recipe '{recipe}' has no flag --{unknown[0].replace('_', '-')}.")
    wanted = {k: v for k, v in catalog.config_values(info, **flags).items() if k not in ("device", "out", "seed")}
    for used in finished_runs(out, recipe):
        if _config_matches(used.dir, wanted):
            return used
    return _train_with_defaults(recipe, Path(out), device, flags, require_met=False)


def _config_matches(run_dir: Path, wanted: dict[str, Any]) -> bool:
    try:
        config = json.loads((run_dir / "config.json").read_text())["config"]
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return all(config.get(name) == value for name, value in wanted.items())


def given_run(run_dir: str | Path, recipe: str, flag: str = "--run") -> UsedRun:
    """A run directory named on the command line (`flag`), checked to be a finished run of `recipe`. Whether
    it met its target is recorded, not required: the user chose it."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    try:
        owner = json.loads(config_path.read_text())["meta"]["recipe"]
    except FileNotFoundError:
        raise UserError(f"{flag} {run_dir} is not a run directory (no config.json).") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"{flag} {run_dir}: its config.json is unreadable ({type(err).__name__}).") from None
    if owner != recipe:
        raise UserError(f"{flag} {run_dir} is a run of '{owner}', not '{recipe}'.")
    used = read_finished(run_dir, recipe)
    if used is None:
        raise UserError(f"{flag} {run_dir} has no readable summary.json: that run did not finish.")
    return used


def _train_with_defaults(recipe: str, out: Path, device: str, flags: dict[str, Any] | None = None,
                         require_met: bool = True) -> UsedRun:
    info = catalog.get(recipe)
    if info.field("out") is None:
        raise UserError(f"Recipe '{recipe}' writes no run directory (no --out flag): there is no run to use.")
    target = f" ({info.target})" if info.target else ""
    command = [sys.executable, str(info.path), "--out", str(out)]
    if info.field("device") is not None:
        command += ["--device", device]
    for name, value in (flags or {}).items():
        flag = "--" + name.replace("_", "-")
        command += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    if flags:
        print(f"note: no run of {recipe} under {out} with {' '.join(command[3:])}; training one first.", flush=True)
    else:
        print(f"note: no run of {recipe} under {out} met its target{target}; training one with its defaults first.",
              flush=True)
    code = _run_child(command, {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV
                                and not k.startswith("TORCHELASTIC_")})
    if code == TrainingInterrupted.exit_code:
        raise TrainingInterrupted(f"Stopped while training {recipe} first; run the same command again to "
                                  f"train it anew, or resume that run as printed above and then run this again.")
    if code != 0:
        raise UserError(f"Training {recipe} with its defaults failed (exit code {code}; its error is above).")
    if not require_met:  # the run just trained is the newest finished one
        newest = next(iter(finished_runs(out, recipe)), None)
        if newest is None:
            raise UserError(f"Training {recipe} wrote no summary.json under {out}.")
        return UsedRun(newest.recipe, newest.dir, newest.metric, newest.value, newest.target_met, trained_now=True)
    used = newest_met_run(out, recipe)
    if used is None:
        newest = next(iter(finished_runs(out, recipe)), None)
        seen = f": {newest.metric} = {newest.value:.4g} in {newest.dir}" if newest and newest.value is not None else ""
        raise UserError(f"{recipe} trained with its defaults did not meet its target{target}{seen}.")
    return UsedRun(used.recipe, used.dir, used.metric, used.value, used.target_met, trained_now=True)


def _run_child(command: list[str], env: dict[str, str]) -> int:
    """Run `command` with this terminal. A Ctrl-C reaches the child from the terminal (the same process group);
    it stops after its step and saves, so meanwhile this process waits for it instead of abandoning it. (A
    no-op handler, not SIG_IGN: an ignored signal would stay ignored in the child.)"""
    if threading.current_thread() is not threading.main_thread():
        return subprocess.call(command, env=env)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        return subprocess.call(command, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_order(run_dir: Path) -> tuple[str, int]:
    """Run directories are `YYYYmmdd-HHMMSS`, with `-N` added when several start in the same second."""
    parts = run_dir.name.split("-")
    suffix = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
    return "-".join(parts[:2]), suffix
