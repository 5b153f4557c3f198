"""The files of one run directory: config.json, metrics.jsonl + TensorBoard, summary.json, curves.png.

    runs/<recipe>/<YYYYmmdd-HHMMSS>/
        config.json      the Config the run used, plus device and versions (and each resume, and `record`s)
        metrics.jsonl    one JSON line per logged epoch or step; `time_s` is the run's clock
        events.out.tfevents.*   TensorBoard (`tensorboard --logdir runs`)
        curves.png       every logged metric against the epoch/step
        summary.json     final metrics, the recipe's target and whether it was met, wall time

In a multi-process run only rank 0 writes; every rank keeps the history of what it logged.
Files that are rewritten go through `durable.write_text_durably`, so none is ever half-written.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from dlnotes import distributed
from dlnotes.durable import write_text_durably
from dlnotes.errors import UserError


def new_run_dir(out: Path, recipe: str) -> Path:
    """A fresh `out/recipe/timestamp` directory; an existing run is never overwritten."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        (out / recipe).mkdir(parents=True, exist_ok=True)
        for suffix in ["", *(f"-{n}" for n in range(1, 1000))]:
            candidate = out / recipe / f"{stamp}{suffix}"
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    except OSError as err:
        raise UserError(f"Cannot write runs under --out {out}: {err.strerror}.") from err
    raise UserError(f"Too many runs of {recipe} started in the same second under {out}.")


def list_runs(out: Path, recipe: str | None = None) -> list[Path]:
    """Finished and unfinished run directories, oldest first."""
    pattern = f"{recipe}/*/config.json" if recipe else "*/*/config.json"
    return sorted((p.parent for p in Path(out).glob(pattern)), key=lambda p: (p.name, p.parent.name))


def latest_run(out: str | Path, recipe: str) -> Path:
    runs = list_runs(Path(out), recipe)
    if not runs:
        raise UserError(f"No runs of {recipe} under {out}.")
    return runs[-1]


def read_run_config(run_dir: str | Path, recipe: str) -> dict[str, Any]:
    """config.json of a run directory, checked to belong to `recipe`."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json).")
    try:
        saved = json.loads(path.read_text())
        owner = saved["meta"]["recipe"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{run_dir} is not a run directory (its config.json is unreadable).") from err
    if owner != recipe:
        raise UserError(f"{run_dir} is a run of '{owner}', not '{recipe}'.")
    return saved


def plain(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers, so JSON and f-strings take them."""
    return value.item() if hasattr(value, "item") else value


LOCK_NAME = ".lock"


def lock_run_dir(run_dir: Path) -> Path:
    """Claim `run_dir` for this process: `.lock` holds its pid while it writes there. A second process (two
    `--resume` of one run) is refused with the holder's pid; a lock left by a process that is gone is taken over."""
    lock = Path(run_dir) / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and holder != os.getpid() and _alive(holder):
                raise UserError(f"{run_dir} is in use by process {holder} (another run or --resume of it); "
                                "wait for it to end or stop it first.") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone (or it is this one's own)
            continue
        except OSError as err:
            raise UserError(f"Cannot write {lock}: {err.strerror}.") from err
        with os.fdopen(fd, "w") as file:
            file.write(f"{os.getpid()}\n")
        return lock
    raise UserError(f"{run_dir} is being claimed by another process at this very moment; try again.")


def _lock_holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunFiles:
    """Writes one run directory. `new` makes a fresh one, `reopen` continues one for --resume."""

    def __init__(self, run_dir: Path | None, history: list[dict[str, Any]], is_main: bool):
        self.dir = Path(distributed.broadcast(str(run_dir) if is_main else ""))  # the others learn it from rank 0
        self._lock = lock_run_dir(self.dir) if is_main else None
        self.history = history
        self._is_main = is_main
        self._started = time.perf_counter()
        self._metrics = (self.dir / "metrics.jsonl").open("a") if is_main else None
        self._writer: Any = None

    @classmethod
    def new(cls, out: Path, recipe: str, config: dict[str, Any], meta: dict[str, Any], is_main: bool) -> RunFiles:
        run_dir = None
        if is_main:
            run_dir = new_run_dir(out, recipe)
            write_text_durably(run_dir / "config.json", json.dumps({"config": config, "meta": meta}, indent=2))
        return cls(run_dir, [], is_main)

    @classmethod
    def reopen(cls, run_dir: Path, saved: dict[str, Any], config: dict[str, Any], meta: dict[str, Any],
               resumed_from: str, metrics_rows: int, is_main: bool) -> RunFiles:
        """Continue `run_dir`: config.json records the resume (what changed, from which checkpoint), and
        metrics.jsonl keeps the `metrics_rows` rows logged before that checkpoint (later ones are logged again)."""
        if not is_main:
            return cls(run_dir, [], is_main)
        lock_run_dir(run_dir)  # before anything is rewritten: a second --resume of this run stops here
        changed = {k: [saved["config"].get(k), v] for k, v in config.items() if saved["config"].get(k) != v}
        saved.setdefault("resumed", []).append({"from": resumed_from, "changed": changed, "meta": meta})
        saved["config"] = config
        write_text_durably(run_dir / "config.json", json.dumps(saved, indent=2))
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()[:metrics_rows]
        write_text_durably(run_dir / "metrics.jsonl", "".join(line + "\n" for line in rows))
        return cls(run_dir, [json.loads(line) for line in rows], is_main)

    # --- the run's clock: metrics' time_s and the summary's wall time continue across a resume ---------------

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def continue_clock(self, elapsed_s: float) -> None:
        self._started -= elapsed_s

    # --- writing -----------------------------------------------------------------------------------------------

    def record(self, key: str, value: Any) -> None:
        if not self._is_main:
            return
        path = self.dir / "config.json"
        saved = json.loads(path.read_text())
        saved[key] = value
        write_text_durably(path, json.dumps(saved, indent=2))

    def log(self, **values: Any) -> None:
        row = {k: plain(v) for k, v in values.items()}
        row["time_s"] = round(self.elapsed(), 2)  # `dlnotes bench` reads time-to-target here
        self.history.append(row)
        if not self._is_main:
            return
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        x = row.get("step", row.get("epoch", len(self.history)))
        writer = self._tensorboard()
        for key, value in row.items():
            if key not in ("epoch", "step", "time_s") and isinstance(value, (int, float)):
                writer.add_scalar(key, value, x)

    def _tensorboard(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.dir))
        return self._writer

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_text_durably(self.dir / "summary.json", json.dumps(summary, indent=2))

    def write_curves(self, title: str) -> None:
        if self.history and self._is_main:
            from dlnotes.plots import plot_curves

            plot_curves(self.history, self.dir / "curves.png", title=title)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._metrics is not None:
            self._metrics.close()
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None
