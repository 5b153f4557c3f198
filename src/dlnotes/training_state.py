"""Training state: what a resumable run saves and restores, where it stands, and which checkpoints it keeps.

    checkpoints/last-<step>.pt   the newest --keep full training states (every epoch end, every --save-every N
                                 steps, and on Ctrl-C): model, optimizer, scheduler, every RNG state, the
                                 Position in the data order, the epoch's running sums, the run's clock
    checkpoints/best.pt          the state at the best value of the recipe's target metric, in its direction

A resume starts from a `ResumePoint`: by default the newest last-<step>.pt (`resume_point`); a loop with its
own checkpoint format (the Hugging Face Trainer, see `hf_trainer`) supplies its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dlnotes.catalog import Target
from dlnotes.errors import UserError
from dlnotes.options import RunOptions
from dlnotes.runfiles import plain


@dataclass
class Position:
    """Where training stands: the epoch to run (1-based), batches of it already done, optimizer steps done."""

    epoch: int = 1
    batch: int = 0
    step: int = 0


@dataclass(frozen=True)
class ResumePoint:
    """What a resumed run continues from."""

    path: Path  # the checkpoint file (or folder) resumed from; its name is recorded in config.json
    metrics_rows: int  # rows of metrics.jsonl logged before it; later rows are logged again
    state: dict[str, Any] | None = None  # a dlnotes training state; None when the loop restores its own


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((Path(run_dir) / "checkpoints").glob("last-*.pt"))
    return found[-1] if found else None


def resume_point(run_dir: Path, recipe: str) -> ResumePoint:
    """The newest checkpoints/last-<step>.pt of `run_dir`, loaded and checked to belong to `recipe`."""
    from dlnotes.checkpoint import load_state_file

    newest = newest_checkpoint(run_dir)
    if newest is None:
        raise UserError(f"{run_dir} has no checkpoint to resume from (checkpoints/last-*.pt).")
    state = load_state_file(newest, recipe)
    return ResumePoint(newest, state["metrics_rows"], state)


class TrainingState:
    """The attached objects, the Position, the best target value; saves and restores them."""

    def __init__(self, recipe: str, config: Any, options: RunOptions, is_main: bool, resume: ResumePoint | None):
        self.position = Position()
        self.best: float | None = None  # the best value of the target metric so far
        self.restored_extra: dict[str, Any] | None = None
        self.skip = 0  # batches of the current epoch that a resumed run already trained on
        self._recipe, self._config, self._options, self._is_main = recipe, config, options, is_main
        self._resume = resume
        self._attached: dict[str, Any] = {}
        self._in_step = False

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    @property
    def model(self) -> Any:
        return self._attached.get("model")

    def attach(self, model: Any, optimizer: Any, scheduler: Any, generator: Any,
               extra: Callable[[], dict[str, Any]] | None) -> dict[str, Any] | None:
        """Remember what to save; on a resume, restore it all. Returns the restored state (None: a fresh run)."""
        from dlnotes.checkpoint import load_weights, restore_rng

        self._attached = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "generator": generator,
                          "extra": extra}
        state = self._resume.state if self._resume else None
        if state is None:
            return None
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
        self.skip, self.best = self.position.batch, state["best"]
        self.restored_extra = state["extra"]
        return state

    # --- the position, step by step ---------------------------------------------------------------------------

    def start_pass(self) -> int:
        """A pass over an epoch's batches begins: returns how many of them a resumed run already did."""
        skip, self.skip = self.skip, 0
        if skip == 0:
            self.position.batch = 0
        return skip

    def begin_step(self) -> None:
        self._in_step = True

    def end_step(self) -> None:
        self._in_step = False
        self.position.batch += 1
        self.position.step += 1

    def end_epoch(self, epoch: int) -> None:
        self.position = Position(epoch=epoch + 1, batch=0, step=self.position.step)

    def resume_position(self) -> Position:
        """Saved from inside a step's body (e.g. after an evaluation at step N), the step counts as done."""
        if not self._in_step:
            return self.position
        return Position(self.position.epoch, self.position.batch + 1, self.position.step + 1)

    # --- saving ------------------------------------------------------------------------------------------------

    def save_due(self) -> bool:
        """--save-every N: a step boundary at a multiple of N writes a checkpoint."""
        return bool(self._options.save_every) and self.position.step % self._options.save_every == 0

    def improved(self, target: Target | None, metrics: dict[str, Any]) -> bool:
        """The target metric in `metrics` beats the best so far (in the target's direction); it becomes the best."""
        if not target or target.metric not in metrics:
            return False
        value = float(plain(metrics[target.metric]))
        if not target.better(value, self.best):
            return False
        self.best = value
        return True

    def save(self, run_dir: Path, sums: dict[str, Any], counts: dict[str, int], metrics_rows: int,
             elapsed_s: float, name: str = "") -> Path:
        """Write a full training state to checkpoints/ (last-<step>.pt, keeping the newest --keep; or `name`)."""
        from dlnotes.checkpoint import atomic_save, capture_rng, checkpoint_state

        folder = run_dir / "checkpoints"
        if self._is_main:
            folder.mkdir(exist_ok=True)
        model, optimizer, scheduler, generator = (self._attached[k] for k in
                                                   ("model", "optimizer", "scheduler", "generator"))
        state = checkpoint_state(
            self._recipe, model, self._config,
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            rng=capture_rng(generator), position=asdict(self.resume_position()),
            sums={k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in sums.items()},
            counts=dict(counts), best=self.best, metrics_rows=metrics_rows, elapsed_s=elapsed_s,
            extra=self._attached["extra"]() if self._attached["extra"] else None,
        )
        step = state["position"]["step"]
        path = folder / (name or f"last-{step:08d}.pt")
        if not self._is_main:
            return path
        atomic_save(state, path)
        if not name:
            for old in sorted(folder.glob("last-*.pt"))[: -max(self._options.keep, 1)]:
                old.unlink()
        return path
