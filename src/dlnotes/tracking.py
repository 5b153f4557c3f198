"""Run tracking: `Run` is what a recipe talks to while it trains; it puts each request in the room for it.

    runfiles.py        the run directory: config.json, metrics.jsonl + TensorBoard, summary.json, curves.png
    progress.py        the step loop's bar (or plain lines in logs), samples/s, epoch sums and means
    training_state.py  attach / save / restore, checkpoints/last-<step>.pt (--save-every, --keep), best.pt
    interrupts.py      Ctrl-C as a stop request
    durable.py         every rewritten run file goes through one durable write
    options.py         the launch options (--resume, --save-every, --keep), set by the launcher
    hf_trainer.py      the same for a Hugging Face Trainer loop

What a recipe uses (nothing else; every other member is private):

    run = Run(__file__, cfg, device)       a fresh run directory, or the one --resume names
    run.dir, run.recipe, run.target, run.is_main, run.world_size, run.options
    start = run.attach(model, optimizer, scheduler, generator, extra=...)
                                           make training resumable; on --resume restores all of them and
                                           returns the Position (epoch, batch, step) to start from;
                                           `extra()`'s saved dict is then in run.restored_extra
    for batch in run.steps(batches, total, desc):
        ...; run.update(samples, loss=loss)
                                           the step iterator; see `Run.steps` for what its step boundary does
    run.epoch_mean("loss"), run.samples_per_s
    run.end_epoch(epoch, **metrics)        log the epoch, checkpoint it, keep best.pt by the target
    run.save_checkpoints(**metrics)        the same checkpoints mid-epoch (dqn's evaluations)
    run.log(**values), run.history         one row of metrics.jsonl (`step` or `epoch` is the x axis)
    run.record(key, value)                 add to config.json (which other run, which installed data)
    return run.finish(metrics)             summary.json, curves.png, the printed summary
    run.close()                            for runs that end without `finish` (llm-chat)

For loops that checkpoint themselves (`hf_trainer` uses these): Run(..., resume_from=...) to find their own
checkpoint format on --resume, run.resumed_from, run.watch_interrupts(), run.stop_requested,
run.interrupted(checkpoint, step) and run.diverged(key, value, step, epoch, checkpoint) (the errors that end
the run, exit codes 130 and 3).

Training that survives interruption: after `attach`, Ctrl-C finishes the current step, writes a checkpoint
with optimizer, scheduler, every RNG state and the position in the data order, and stops with exit code 130;
a second Ctrl-C stops at once (every run file is written durably, so none is ever half-written).
`dlnotes run ID --resume RUN_DIR` continues the same directory. A non-finite loss stops the run and names the
step (exit code 3).

In a multi-process run (torchrun) every rank makes a Run, but only rank 0 writes or prints; the others learn
the directory from it. Epoch means are averaged over all ranks, and samples/s counts the global batch.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from dlnotes import __version__, distributed
from dlnotes.catalog import RecipeInfo, Target, all_recipes, read_targets, recipe_id
from dlnotes.errors import TrainingDiverged, TrainingInterrupted, UserError
from dlnotes.interrupts import StopRequests
from dlnotes.options import RunOptions, current_launch
from dlnotes.progress import Progress
from dlnotes.runfiles import RunFiles, latest_run, list_runs, new_run_dir, read_run_config
from dlnotes.training_state import Position, ResumePoint, TrainingState, newest_checkpoint, resume_point

__all__ = ["Position", "ResumePoint", "Run", "latest_run", "list_runs", "new_run_dir", "read_run_config"]

T = TypeVar("T")


class Run:
    """What a recipe writes while it trains. Create it first; call `finish` with the final metrics.

    `resume_from(run_dir, recipe)` finds what a --resume continues from: by default the newest
    checkpoints/last-<step>.pt; `hf_trainer.resume_point` for the Trainer's checkpoint-N folders."""

    def __init__(self, recipe_file: str, config: Any, device: Any = "cpu", options: RunOptions | None = None,
                 resume_from: Callable[[Path, str], ResumePoint] = resume_point):
        launch = current_launch()
        self.recipe = recipe_id(recipe_file)
        self.target, self.also_targets = _recipe_targets(Path(recipe_file), launch.recipe)
        self._config = config
        self._device = str(device)
        self.options = options or launch.options
        self.is_main = distributed.is_main()
        self.world_size = distributed.world_size()
        meta = {"recipe": self.recipe, "device": self._device, "dlnotes": __version__,
                "python": platform.python_version(), "torch": _torch_version(), "world_size": self.world_size}
        resume = None
        if self.options.resume:
            run_dir = Path(self.options.resume)
            saved = read_run_config(run_dir, self.recipe)
            resume = resume_from(run_dir, self.recipe)
            self._files = RunFiles.reopen(run_dir, saved, asdict(config), meta, resume.path.name, resume.metrics_rows,
                                          self.is_main)
        else:
            self._files = RunFiles.new(Path(config.out), self.recipe, asdict(config), meta, self.is_main)
        self.dir = self._files.dir
        self.resumed_from: Path | None = resume.path if resume else None  # the checkpoint a --resume continues
        self._state = TrainingState(self.recipe, config, self.options, self.is_main, resume)
        self._progress = Progress(self.world_size)
        self._stops = StopRequests(announce=self.is_main)
        launch.runs.append(self)  # closed when the launch ends, should main() raise before `finish`

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every row logged so far (on --resume, starting with the rows before the checkpoint)."""
        return self._files.history

    @property
    def samples_per_s(self) -> float:
        """Of the last `steps` pass."""
        return self._progress.samples_per_s

    @property
    def restored_extra(self) -> dict[str, Any] | None:
        return self._state.restored_extra

    def record(self, key: str, value: Any) -> None:
        """Add `value` (JSON-able) to config.json under `key`: which other run or which installed data a run used."""
        self._files.record(key, value)

    # --- resumable training ----------------------------------------------------------------------------------

    def attach(self, model: Any, optimizer: Any = None, scheduler: Any = None, generator: Any = None,
               extra: Callable[[], dict[str, Any]] | None = None) -> Position:
        """Make training resumable: Ctrl-C and periodic checkpoints save these objects' states (and whatever
        `extra()` returns). When the run is a resume, their states are restored here and `extra()`'s saved
        dict is in `run.restored_extra`. Returns the Position to start from."""
        self.watch_interrupts()
        state = self._state.attach(model, optimizer, scheduler, generator, extra)
        if state is not None:
            self._progress.continue_epoch(state["sums"], state["counts"])
            self._files.continue_clock(state.get("elapsed_s", 0.0))  # time_s in metrics.jsonl continues
            position = self._state.position
            print(f"resuming {self.dir} at step {position.step} (epoch {position.epoch}, batch {position.batch})",
                  flush=True)
        return self._state.position

    def watch_interrupts(self) -> None:
        """A stop signal (Ctrl-C, SIGTERM, SIGUSR1) from now on sets `stop_requested` (`attach` does this; a loop
        that checkpoints itself calls it)."""
        self._stops.watch()

    @property
    def stop_requested(self) -> bool:
        return self._stops.requested

    @property
    def quit_at_once(self) -> BaseException | None:
        """The StopNow a second stop signal raised, if one did: for adapters whose framework catches it."""
        return self._stops.quit

    def steps(self, iterable: Iterable[T], total: int, desc: str) -> Iterator[T]:
        """Yield from `iterable`, one training step each, showing progress: a live bar on a terminal, a line every
        few seconds otherwise. Inside the loop call `run.update(samples, loss=loss)`; values are read only when
        shown. A resumed epoch skips the batches it already trained on.

        Each step boundary (after the loop body, before the next item) is where the run acts, in this order:
        a loss given to `update` that was NaN or infinite raises TrainingDiverged (exit code 3, naming the step
        and the last good checkpoint); a stop request (Ctrl-C) writes a checkpoint and raises
        TrainingInterrupted; every --save-every N steps a checkpoint is written."""
        done = self._state.start_pass()
        if done == 0:
            self._progress.new_epoch()
        yield from self._progress.steps(self._not_done(iterable, done), total, desc, done, self._step_boundary)

    def _not_done(self, iterable: Iterable[T], done: int) -> Iterator[T]:
        for i, item in enumerate(iterable):
            if i >= done:
                self._state.begin_step()
                yield item

    def _step_boundary(self) -> None:
        self._state.end_step()
        self._stop_if_diverged()
        if not self._state.attached:
            return
        stop = self._stops.requested
        if self.world_size > 1:  # every rank must stop after the same step, or the others wait for it forever
            stop = distributed.any_rank(stop)
        if stop:
            raise self.interrupted(self._save())
        if self._state.save_due():
            self._save()

    def update(self, samples: int, **values: Any) -> None:
        """After each step: count samples (the global batch's, in a multi-process run), show `values` in the
        progress line, sum them for `epoch_mean`. A non-finite loss stops the run at the step boundary."""
        self._progress.update(samples, **values)

    def epoch_mean(self, key: str) -> float:
        """Mean of `key` over this epoch's updates (summed on the device, read once here), over all ranks."""
        return self._progress.epoch_mean(key)

    def end_epoch(self, epoch: int, **metrics: Any) -> None:
        """Log the epoch's metrics, checkpoint the run, and keep checkpoints/best.pt by the target metric."""
        self._stop_if_diverged()
        self.log(epoch=epoch, **metrics)
        self._state.end_epoch(epoch)
        self.save_checkpoints(**metrics)

    def save_checkpoints(self, **metrics: Any) -> None:
        """checkpoints/last-<step>.pt now, and checkpoints/best.pt when the target metric in `metrics` improved."""
        self._stop_if_diverged()
        if not self._state.attached:
            return
        self._save()
        if self._state.improved(self.target, metrics):
            self._save("best.pt")

    def _save(self, name: str = "") -> Path:
        try:
            return self._state.save(self.dir, self._progress.sums, self._progress.counts, len(self.history),
                                    self._files.elapsed(), name)
        except UserError as err:  # the disk is full (or read-only): say which checkpoint still holds the run
            good = newest_checkpoint(self.dir)
            self._end_early()
            raise UserError(f"{err} " + (f"Last good checkpoint: {good} (resume from it once there is room)."
                                         if good else "No checkpoint was written before it.")) from err

    # --- stopping early ----------------------------------------------------------------------------------------

    def _stop_if_diverged(self) -> None:
        """After a non-finite loss nothing more is logged or saved: the step boundary, or any log, checkpoint
        or summary before it, ends the run. So no checkpoint ever holds the diverged weights."""
        if self._progress.nonfinite is not None:
            raise self.diverged(*self._progress.nonfinite)

    def diverged(self, key: str, value: float, step: int | None = None, epoch: int | None = None,
                 checkpoint: Path | None = None) -> TrainingDiverged:
        """The error that ends a run whose `key` became `value` (NaN or infinite), naming the step, the last good
        checkpoint (default: the newest last-<step>.pt) and a lower learning rate."""
        position = self._state.resume_position()
        good = checkpoint or newest_checkpoint(self.dir)
        lr = getattr(self._config, "lr", None)
        self._end_early()
        return TrainingDiverged(
            f"{key} became {value} at step {position.step if step is None else step} "
            f"(epoch {position.epoch if epoch is None else epoch}); "
            "training stopped. "
            + (f"Last good checkpoint: {good}. " if good else "No checkpoint was written before it. ")
            + (f"Try a lower learning rate than --lr {lr}." if lr is not None else "Try a lower learning rate."))

    def interrupted(self, checkpoint: Path, step: int | None = None) -> TrainingInterrupted:
        """The error that ends an interrupted run, saying how to resume it."""
        self._end_early()
        stop = TrainingInterrupted(f"Interrupted at step {self._state.position.step if step is None else step}; "
                                   f"saved {checkpoint}. Resume with: dlnotes run {self.recipe} --resume {self.dir}")
        stop.exit_code = self._stops.exit_code  # 130 after Ctrl-C, 143 after SIGTERM, 138 after SIGUSR1
        return stop

    def _end_early(self) -> None:
        self._files.write_curves(self.recipe)
        self.close()

    # --- the end ---------------------------------------------------------------------------------------------

    def log(self, **values: Any) -> None:
        """One line of metrics.jsonl, one TensorBoard point per value; `epoch` or `step` is the x axis."""
        self._stop_if_diverged()
        self._files.log(**values)

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """Write summary.json and curves.png, print the summary, and return `metrics` unchanged."""
        self._stop_if_diverged()
        wall = self._files.elapsed()
        extra = {}
        if self.world_size > 1 and self._state.model is not None:
            # A check that DDP did its job: every process must end with rank 0's weights, bit for bit.
            extra = {"world_size": self.world_size,
                     "replica_max_difference": distributed.replica_difference(self._state.model)}
        if not self.is_main:
            self.close()
            return metrics
        checked = [(target, target.met(float(metrics[target.metric])))
                   for target in (self.target, *self.also_targets) if target and target.metric in metrics]
        met = all(ok for _, ok in checked) if checked else None
        also = [[*target.as_list(), ok] for target, ok in checked if target is not self.target]
        self._files.write_summary({"recipe": self.recipe, "metrics": metrics,
                                   "target": self.target.as_list() if self.target else None, "target_met": met,
                                   **({"also_targets": also} if also else {}),
                                   "wall_time_s": round(wall, 2), "device": self._device, **extra})
        self._files.write_curves(self.recipe)
        self.close()
        print(f"\n{self.recipe} finished in {wall:.1f} s on {self._device}")
        for key, value in metrics.items():
            print(f"  {key:<16} {value:.4f}" if isinstance(value, float) else f"  {key:<16} {value}")
        for target, ok in checked:
            print(f"  target           {target}: {'met' if ok else 'NOT met'}")
        print(f"  run directory    {self.dir}")
        return metrics

    def close(self) -> None:
        self._files.close()
        self._stops.release()


def _recipe_targets(path: Path, launched: RecipeInfo | None) -> tuple[Target | None, tuple[Target, ...]]:
    """The recipe file's TARGET and ALSO_TARGETS from its catalog entry: the launcher's, else the catalog's (read
    once per process); a file outside the catalog (a copied recipe, whose Config may have computed defaults) has
    only its targets read here."""
    path = path.resolve()
    if launched is not None and launched.path.resolve() == path:
        return launched.target, launched.also_targets
    listed = all_recipes().get(recipe_id(path))
    if listed is not None and listed.path.resolve() == path:
        return listed.target, listed.also_targets
    return read_targets(path)


def _torch_version() -> str:
    import torch

    return torch.__version__
