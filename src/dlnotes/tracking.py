"""Run tracking: one directory per run with config.json, metrics.jsonl, TensorBoard events, plots, summary.

    runs/<recipe>/<YYYYmmdd-HHMMSS>/
        config.json      the Config the run used, plus device and versions
        metrics.jsonl    one JSON line per logged epoch or step
        events.out.tfevents.*   TensorBoard (`tensorboard --logdir runs`)
        curves.png       every logged metric against the epoch/step
        summary.json     final metrics, the recipe's target and whether it was met, wall time
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from dlnotes import __version__
from dlnotes.catalog import read_recipe, recipe_id
from dlnotes.errors import UserError

T = TypeVar("T")
PLAIN_PROGRESS_EVERY_S = 10.0  # without a terminal, one progress line this often keeps CI logs readable


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


class Run:
    """What a recipe writes while it trains. Create it first; call `finish` with the final metrics."""

    def __init__(self, recipe_file: str, config: Any, device: Any = "cpu") -> None:
        self.recipe = recipe_id(recipe_file)
        self.target = read_recipe(Path(recipe_file)).target
        self.config = config
        self.device = str(device)
        self.dir = new_run_dir(Path(config.out), self.recipe)
        self.history: list[dict[str, Any]] = []
        self.samples_per_s = 0.0
        self._started = time.perf_counter()
        self._writer: Any = None
        self._samples = 0
        self._live: dict[str, Any] = {}
        meta = {"recipe": self.recipe, "device": self.device, "dlnotes": __version__,
                "python": platform.python_version(), "torch": _torch_version()}
        (self.dir / "config.json").write_text(json.dumps({"config": asdict(config), "meta": meta}, indent=2))
        self._metrics = (self.dir / "metrics.jsonl").open("a")

    # --- metrics ---------------------------------------------------------------------------------------------

    def log(self, **values: Any) -> None:
        """One line of metrics.jsonl, one TensorBoard point per value; `epoch` or `step` is the x axis."""
        row = {k: _plain(v) for k, v in values.items()}
        self.history.append(row)
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        x = row.get("step", row.get("epoch", len(self.history)))
        writer = self._tensorboard()
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                writer.add_scalar(key, value, x)

    def _tensorboard(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.dir))
        return self._writer

    # --- progress --------------------------------------------------------------------------------------------

    def progress(self, iterable: Iterable[T], total: int, desc: str) -> Iterator[T]:
        """Yield from `iterable`, showing progress: a live bar on a terminal, a line every few seconds otherwise.
        Inside the loop call `run.update(samples, loss=loss)`; values are read only when shown."""
        self._samples, self._live = 0, {}
        start = time.perf_counter()
        if sys.stdout.isatty():
            yield from self._rich_progress(iterable, total, desc, start)
        else:
            last_print = start
            for i, item in enumerate(iterable, 1):
                yield item
                now = time.perf_counter()
                if now - last_print >= PLAIN_PROGRESS_EVERY_S or i == total:
                    last_print = now
                    print(f"{desc} {i}/{total} {self._status(now - start)}", flush=True)
        self.samples_per_s = self._samples / max(time.perf_counter() - start, 1e-9)

    def _rich_progress(self, iterable: Iterable[T], total: int, desc: str, start: float) -> Iterator[T]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}"))
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(desc, total=total, status="")
            last_shown = start
            for item in iterable:
                yield item
                now = time.perf_counter()
                status = None
                if now - last_shown > 0.25:  # reading a CUDA loss forces a sync: do it a few times a second only
                    last_shown, status = now, self._status(now - start)
                bar.update(task, advance=1, **({"status": status} if status else {}))
            bar.update(task, status=self._status(time.perf_counter() - start))

    def update(self, samples: int, **values: Any) -> None:
        self._samples += samples
        self._live = values

    def _status(self, elapsed: float) -> str:
        parts = [f"{k} {_plain(v):.4f}" for k, v in self._live.items()]
        parts.append(f"{self._samples / max(elapsed, 1e-9):,.0f} samples/s")
        return "  ".join(parts)

    # --- the end ---------------------------------------------------------------------------------------------

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """Write summary.json and curves.png, print the summary, and return `metrics` unchanged."""
        wall = time.perf_counter() - self._started
        met = None
        if self.target and self.target[0] in metrics:
            met = bool(metrics[self.target[0]] >= self.target[1])
        summary = {"recipe": self.recipe, "metrics": metrics, "target": self.target, "target_met": met,
                   "wall_time_s": round(wall, 2), "device": self.device}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.history:
            from dlnotes.plots import plot_curves

            plot_curves(self.history, self.dir / "curves.png", title=self.recipe)
        self.close()
        print(f"\n{self.recipe} finished in {wall:.1f} s on {self.device}")
        for key, value in metrics.items():
            print(f"  {key:<16} {value:.4f}" if isinstance(value, float) else f"  {key:<16} {value}")
        if met is not None:
            name, bound = self.target
            print(f"  target           {name} >= {bound}: {'met' if met else 'NOT met'}")
        print(f"  run directory    {self.dir}")
        return metrics

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._metrics.close()


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers, so JSON and f-strings take them."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return float(value)
    return value


def _torch_version() -> str:
    import torch

    return torch.__version__
