"""Run tracking: one directory per run with config.json, metrics.jsonl, TensorBoard events, plots, summary.

    runs/<recipe>/<YYYYmmdd-HHMMSS>/
        config.json      the Config the run used, plus device and versions
        metrics.jsonl    one JSON line per logged epoch or step
        events.out.tfevents.*   TensorBoard (`tensorboard --logdir runs`)
        curves.png       every logged metric against the epoch/step
        summary.json     final metrics, the recipe's target and whether it was met, wall time
        checkpoints/     training states to resume from: last-<step>.pt (the newest K) and best.pt

Training that survives interruption: `run.attach(model, optimizer, scheduler, generator)` makes the run
resumable. Ctrl-C then finishes the current step, writes a checkpoint with optimizer, scheduler, every RNG
state and the position in the data order, and stops with exit code 130; a second Ctrl-C stops at once
(checkpoints are written to a temporary file and renamed, so none is ever half-written).
`dlnotes run ID --resume RUN_DIR` continues the same directory. A non-finite loss stops the run and names
the step.

In a multi-process run (torchrun) every rank makes a Run, but only rank 0 writes or prints; the others learn
the directory from it. Epoch means are averaged over all ranks, and samples/s counts the global batch.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from dlnotes import __version__, distributed
from dlnotes.catalog import read_target, recipe_id
from dlnotes.errors import TrainingDiverged, TrainingInterrupted, UserError
from dlnotes.flags import RunOptions

T = TypeVar("T")
PLAIN_PROGRESS_EVERY_S = 10.0  # without a terminal, one progress line this often keeps CI logs readable
RESUMABLE_CHANGES = ("epochs", "total_steps", "device", "out")  # a resumed run may change these; not the rest

_launch_options = RunOptions()


def use_options(options: RunOptions) -> None:
    """Set the launch options (--resume, --save-every, --keep) that the next Run picks up."""
    global _launch_options
    _launch_options = options


@dataclass
class Position:
    """Where training stands: the epoch to run (1-based), batches of it already done, optimizer steps done."""

    epoch: int = 1
    batch: int = 0
    step: int = 0


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

    def __init__(self, recipe_file: str, config: Any, device: Any = "cpu", options: RunOptions | None = None):
        self.recipe = recipe_id(recipe_file)
        self.target = read_target(Path(recipe_file))
        self.config = config
        self.device = str(device)
        self.options = options or _launch_options
        self.history: list[dict[str, Any]] = []
        self.samples_per_s = 0.0
        self.position = Position()
        self._started = time.perf_counter()
        self._writer: Any = None
        self._samples = 0
        self._live: dict[str, Any] = {}
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, int] = {}
        self._skip = 0
        self._best: float | None = None
        self._attached: dict[str, Any] = {}
        self._stop_requested = False
        self._in_step = False
        self._previous_handler: Any = None
        self._resume_state: dict[str, Any] | None = None
        self.restored_extra: dict[str, Any] | None = None
        self.trainer_checkpoint: Path | None = None  # set when resuming a Hugging Face Trainer's checkpoint
        self.is_main = distributed.is_main()
        self.world_size = distributed.world_size()
        meta = {"recipe": self.recipe, "device": self.device, "dlnotes": __version__,
                "python": platform.python_version(), "torch": _torch_version(), "world_size": self.world_size}
        if self.options.resume:
            self.dir = Path(self.options.resume)
            self._open_for_resume(meta)
        elif self.is_main:
            self.dir = new_run_dir(Path(config.out), self.recipe)
            (self.dir / "config.json").write_text(json.dumps({"config": asdict(config), "meta": meta}, indent=2))
        self.dir = Path(distributed.broadcast(str(self.dir) if self.is_main else ""))
        self._metrics = (self.dir / "metrics.jsonl").open("a") if self.is_main else None

    def _open_for_resume(self, meta: dict[str, Any]) -> None:
        from dlnotes.checkpoint import load_state_file

        saved = read_run_config(self.dir, self.recipe)
        newest = latest_checkpoint(self.dir)
        trainer_checkpoints = sorted((self.dir / "checkpoints").glob("checkpoint-*"),
                                     key=lambda p: int(p.name.split("-")[1]))
        if newest is None and trainer_checkpoints:  # Hugging Face Trainer's own format (bert-finetune)
            self.trainer_checkpoint = trainer_checkpoints[-1]
            step = int(self.trainer_checkpoint.name.split("-")[1])
            rows = [line for line in (self.dir / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line).get("step", 0) <= step]
            self._resume_state = {"metrics_rows": len(rows)}
        elif newest is None:
            raise UserError(f"{self.dir} has no checkpoint to resume from (checkpoints/last-*.pt).")
        else:
            self._resume_state = load_state_file(newest, self.recipe)
        if not self.is_main:
            return  # rank 0 updates the files
        changed = {k: [saved["config"].get(k), v] for k, v in asdict(self.config).items()
                   if saved["config"].get(k) != v}
        source = newest.name if newest is not None else self.trainer_checkpoint.name
        saved.setdefault("resumed", []).append({"from": source, "changed": changed, "meta": meta})
        saved["config"] = asdict(self.config)
        (self.dir / "config.json").write_text(json.dumps(saved, indent=2))
        # Rows logged after the checkpoint was written will be logged again: keep only the ones before it.
        rows = (self.dir / "metrics.jsonl").read_text().splitlines()[: self._resume_state["metrics_rows"]]
        (self.dir / "metrics.jsonl").write_text("".join(line + "\n" for line in rows))
        self.history = [json.loads(line) for line in rows]

    def record(self, key: str, value: Any) -> None:
        """Add `value` (JSON-able) to config.json under `key`: which other run or which installed data a run used."""
        if not self.is_main:
            return
        path = self.dir / "config.json"
        saved = json.loads(path.read_text())
        saved[key] = value
        path.write_text(json.dumps(saved, indent=2))

    # --- resumable training ----------------------------------------------------------------------------------

    def attach(self, model: Any, optimizer: Any = None, scheduler: Any = None, generator: Any = None,
               extra: Callable[[], dict[str, Any]] | None = None) -> Position:
        """Make training resumable: Ctrl-C and periodic checkpoints save these objects' states (and whatever
        `extra()` returns). When the run is a resume, their states are restored here and `extra()`'s saved
        dict is in `run.restored_extra`. Returns the Position to start from."""
        from dlnotes.checkpoint import load_weights, restore_rng

        self._attached = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "generator": generator,
                          "extra": extra}
        self.watch_interrupts()
        state = self._resume_state
        if state is None:
            return self.position
        load_weights(model, state)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            # A resume may change --epochs: keep the schedule's new length, continue from the saved step.
            fresh = scheduler.state_dict()
            scheduler.load_state_dict(state["scheduler"] | {k: fresh[k] for k in ("total_steps", "_schedule_phases")
                                                            if k in fresh})
        restore_rng(state["rng"], generator)
        self.position = Position(**state["position"])
        self._sums, self._counts = state["sums"], state["counts"]
        self._skip, self._best = self.position.batch, state["best"]
        self.restored_extra = state["extra"]
        self._started -= state.get("elapsed_s", 0.0)  # time_s in metrics.jsonl continues where it stopped
        print(f"resuming {self.dir} at step {self.position.step} "
              f"(epoch {self.position.epoch}, batch {self.position.batch})", flush=True)
        return self.position

    def watch_interrupts(self) -> None:
        """For loops that checkpoint themselves (the Hugging Face Trainer): Ctrl-C only sets `stop_requested`."""
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def interrupted(self, checkpoint: Path) -> TrainingInterrupted:
        """The error that ends an interrupted run, saying how to resume it."""
        self._write_curves()
        self.close()
        return TrainingInterrupted(f"Interrupted at step {self.position.step}; saved {checkpoint}. "
                                   f"Resume with: dlnotes run {self.recipe} --resume {self.dir}")

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # the second Ctrl-C: stop now; checkpoints on disk are whole (atomic renames)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._stop_requested = True
        if self.is_main:
            print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)",
                  file=sys.stderr, flush=True)

    def _after_step(self) -> None:
        self._in_step = False
        self.position.batch += 1
        self.position.step += 1
        if not self._attached:
            return
        stop = self._stop_requested
        if self.world_size > 1:  # every rank must stop after the same step, or the others wait for it forever
            stop = distributed.any_rank(stop)
        if stop:
            raise self.interrupted(self.save_state())
        if self.options.save_every and self.position.step % self.options.save_every == 0:
            self.save_state()

    def save_state(self, name: str = "") -> Path:
        """Write a full training state to checkpoints/ (last-<step>.pt, keeping the newest --keep)."""
        from dlnotes.checkpoint import atomic_save, capture_rng, checkpoint_state

        folder = self.dir / "checkpoints"
        if self.is_main:
            folder.mkdir(exist_ok=True)
        model, optimizer, scheduler, generator = (self._attached[k] for k in
                                                   ("model", "optimizer", "scheduler", "generator"))
        state = checkpoint_state(
            self.recipe, model, self.config,
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            rng=capture_rng(generator), position=asdict(self._position_to_resume()),
            sums={k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in self._sums.items()},
            counts=dict(self._counts), best=self._best, metrics_rows=len(self.history),
            elapsed_s=time.perf_counter() - self._started,
            extra=self._attached["extra"]() if self._attached["extra"] else None,
        )
        step = state["position"]["step"]
        path = folder / (name or f"last-{step:08d}.pt")
        if not self.is_main:
            return path
        atomic_save(state, path)
        if not name:
            for old in sorted(folder.glob("last-*.pt"))[: -max(self.options.keep, 1)]:
                old.unlink()
        return path

    def _position_to_resume(self) -> Position:
        """Saved from inside a step's body (e.g. after an evaluation at step N), the step counts as done."""
        if not self._in_step:
            return self.position
        return Position(self.position.epoch, self.position.batch + 1, self.position.step + 1)

    def end_epoch(self, epoch: int, **metrics: Any) -> None:
        """Log the epoch's metrics, checkpoint the run, and keep checkpoints/best.pt by the target metric."""
        self.log(epoch=epoch, **metrics)
        self.position = Position(epoch=epoch + 1, batch=0, step=self.position.step)
        self.save_checkpoints(**metrics)

    def save_checkpoints(self, **metrics: Any) -> None:
        """checkpoints/last-<step>.pt now, and checkpoints/best.pt when the target metric in `metrics` improved."""
        if not self._attached:
            return
        self.save_state()
        if self.target and self.target.metric in metrics:
            value = float(_plain(metrics[self.target.metric]))
            if self.target.better(value, self._best):
                self._best = value
                self.save_state("best.pt")

    # --- metrics ---------------------------------------------------------------------------------------------

    def log(self, **values: Any) -> None:
        """One line of metrics.jsonl, one TensorBoard point per value; `epoch` or `step` is the x axis."""
        row = {k: _plain(v) for k, v in values.items()}
        row["time_s"] = round(time.perf_counter() - self._started, 2)  # `dlnotes bench` reads time-to-target here
        self.history.append(row)
        if not self.is_main:
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

    # --- progress --------------------------------------------------------------------------------------------

    def steps(self, iterable: Iterable[T], total: int, desc: str) -> Iterator[T]:
        """Yield from `iterable`, one training step each, showing progress: a live bar on a terminal, a line every
        few seconds otherwise. Inside the loop call `run.update(samples, loss=loss)`; values are read only when
        shown. Each step boundary is where a stop request (Ctrl-C) and --save-every act: the iterator may write a
        checkpoint there and raise TrainingInterrupted."""
        self._samples, self._live = 0, {}
        done = self._skip
        iterable = self._skip_done(iterable)
        start = time.perf_counter()
        try:
            if sys.stdout.isatty():
                yield from self._rich_progress(iterable, total, desc, start, done)
            else:
                yield from self._plain_progress(iterable, total, desc, start, done)
        finally:  # also when the loop breaks early (e.g. dqn stops once solved)
            self.samples_per_s = self._samples / max(time.perf_counter() - start, 1e-9)

    def _plain_progress(self, iterable: Iterable[T], total: int, desc: str, start: float, done: int) -> Iterator[T]:
        last_print, shown, i = start, done, done
        try:
            for i, item in enumerate(iterable, 1 + done):
                yield item
                self._after_step()
                now = time.perf_counter()
                if now - last_print >= PLAIN_PROGRESS_EVERY_S or i == total:
                    last_print, shown = now, i
                    print(f"{desc} {i}/{total} {self._status(now - start)}", flush=True)
        finally:
            if shown != i:
                print(f"{desc} {i}/{total} {self._status(time.perf_counter() - start)}", flush=True)

    def _rich_progress(self, iterable: Iterable[T], total: int, desc: str, start: float, done: int) -> Iterator[T]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}"))
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(desc, total=total, status="", completed=done)
            last_shown = start
            for item in iterable:
                yield item
                self._after_step()
                now = time.perf_counter()
                status = None
                if now - last_shown > 0.25:  # reading a CUDA loss forces a sync: do it a few times a second only
                    last_shown, status = now, self._status(now - start)
                bar.update(task, advance=1, **({"status": status} if status else {}))
            bar.update(task, status=self._status(time.perf_counter() - start))

    def _skip_done(self, iterable: Iterable[T]) -> Iterator[T]:
        """A new epoch starts its sums afresh; a resumed one skips the batches it already trained on."""
        skip, self._skip = self._skip, 0
        if skip == 0:
            self._sums, self._counts = {}, {}
            self.position.batch = 0
        for i, item in enumerate(iterable):
            if i >= skip:
                self._in_step = True
                yield item

    def update(self, samples: int, **values: Any) -> None:
        """After each step: count samples (the global batch's, in a multi-process run), show `values` in the
        progress line, sum them for `epoch_mean`.
        A loss that is NaN or infinite stops the run here, naming the step."""
        self._samples += samples
        self._live = values
        for key, value in values.items():
            if value is None:
                continue
            self._sums[key] = self._sums.get(key, 0.0) + (value.detach() if hasattr(value, "detach") else value)
            self._counts[key] = self._counts.get(key, 0) + 1
            if "loss" in key and not math.isfinite(float(_plain(value))):
                self._diverged(key, float(_plain(value)))

    def epoch_mean(self, key: str) -> float:
        """Mean of `key` over this epoch's updates (summed on the device, read once here), over all ranks."""
        total = self._sums[key]
        if self.world_size > 1:  # every rank calls this at the same point: add up all ranks' sums
            import torch

            total = distributed.all_sum(total.clone() if hasattr(total, "clone") else torch.tensor(float(total)))
        return float(_plain(total)) / max(self._counts.get(key, 0) * self.world_size, 1)

    def _diverged(self, key: str, value: float) -> None:
        good = latest_checkpoint(self.dir)
        lr = getattr(self.config, "lr", None)
        self._write_curves()
        self.close()
        raise TrainingDiverged(
            f"{key} became {value} at step {self.position.step + 1} (epoch {self.position.epoch}); training stopped. "
            + (f"Last good checkpoint: {good}. " if good else "No checkpoint was written before it. ")
            + (f"Try a lower learning rate than --lr {lr}." if lr is not None else "Try a lower learning rate."))

    def _status(self, elapsed: float) -> str:
        parts = [f"{k} {_plain(v):.4f}" for k, v in self._live.items()]
        parts.append(f"{self._samples / max(elapsed, 1e-9):,.0f} samples/s")
        return "  ".join(parts)

    # --- the end ---------------------------------------------------------------------------------------------

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """Write summary.json and curves.png, print the summary, and return `metrics` unchanged."""
        wall = time.perf_counter() - self._started
        extra = {}
        if self.world_size > 1 and self._attached.get("model") is not None:
            # A check that DDP did its job: every process must end with rank 0's weights, bit for bit.
            extra = {"world_size": self.world_size,
                     "replica_max_difference": distributed.replica_difference(self._attached["model"])}
        if not self.is_main:
            self.close()
            return metrics
        met = None
        if self.target and self.target.metric in metrics:
            met = self.target.met(float(metrics[self.target.metric]))
        summary = {"recipe": self.recipe, "metrics": metrics,
                   "target": self.target.as_list() if self.target else None, "target_met": met,
                   "wall_time_s": round(wall, 2), "device": self.device, **extra}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._write_curves()
        self.close()
        print(f"\n{self.recipe} finished in {wall:.1f} s on {self.device}")
        for key, value in metrics.items():
            print(f"  {key:<16} {value:.4f}" if isinstance(value, float) else f"  {key:<16} {value}")
        if met is not None:
            print(f"  target           {self.target}: {'met' if met else 'NOT met'}")
        print(f"  run directory    {self.dir}")
        return metrics

    def _write_curves(self) -> None:
        if self.history and self.is_main:
            from dlnotes.plots import plot_curves

            plot_curves(self.history, self.dir / "curves.png", title=self.recipe)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._metrics is not None:
            self._metrics.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("last-*.pt"))
    return found[-1] if found else None


def read_run_config(run_dir: Path, recipe: str) -> dict[str, Any]:
    """config.json of a run directory, checked to belong to `recipe`."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json).")
    saved = json.loads(path.read_text())
    if saved["meta"]["recipe"] != recipe:
        raise UserError(f"{run_dir} is a run of '{saved['meta']['recipe']}', not '{recipe}'.")
    return saved


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers, so JSON and f-strings take them."""
    return value.item() if hasattr(value, "item") else value


def _torch_version() -> str:
    import torch

    return torch.__version__
