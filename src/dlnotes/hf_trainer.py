"""A Hugging Face Trainer inside a dlnotes run: logs, Ctrl-C, --save-every/--keep, --resume, NaN guard.

The Trainer runs its own loop and writes its own checkpoints (`checkpoints/checkpoint-<step>/`: model,
optimizer, scheduler, RNG states), so a recipe that uses it wires the run in with three calls:

    run = Run(__file__, cfg, device, resume_from=hf_trainer.resume_point)   # --resume finds checkpoint-N
    args = TrainingArguments(..., **hf_trainer.save_arguments(run))          # where and how often it saves
    callback = hf_trainer.RunCallback(run)                                   # logs, stop requests, NaN
    trainer = Trainer(..., callbacks=[callback])
    result = trainer.train(resume_from_checkpoint=hf_trainer.resume_checkpoint(run))
    callback.raise_if_interrupted()                                          # after Ctrl-C: exit 130
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from dlnotes import distributed
from dlnotes.errors import UserError
from dlnotes.tracking import Run
from dlnotes.training_state import ResumePoint

# What the Trainer logs -> the metric names the other recipes use in metrics.jsonl.
LOG_NAMES = {"loss": "train_loss", "learning_rate": "lr", "grad_norm": "grad_norm", "eval_loss": "val_loss",
             "eval_accuracy": "val_acc", "epoch": "epoch"}


def save_arguments(run: Run) -> dict[str, Any]:
    """TrainingArguments for the Trainer's checkpoints: inside the run directory, every epoch or every
    --save-every N steps, the newest --keep of them."""
    return {
        "output_dir": str(run.dir / "checkpoints"),
        "save_strategy": "steps" if run.options.save_every else "epoch",
        "save_steps": run.options.save_every or 500,
        "save_total_limit": run.options.keep,
    }


def resume_point(run_dir: Path, recipe: str) -> ResumePoint:
    """For `Run(..., resume_from=...)`: the newest checkpoint-<step> folder; metrics.jsonl keeps the rows
    logged up to that step (the Trainer logs the later ones again)."""
    folder = Path(run_dir) / "checkpoints"
    newest = get_last_checkpoint(folder) if folder.is_dir() else None
    if newest is None:
        raise UserError(f"{run_dir} has no checkpoint to resume from (checkpoints/checkpoint-*).")
    step = int(Path(newest).name.split("-")[1])
    rows = [line for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("step", 0) <= step]
    return ResumePoint(Path(newest), len(rows))


def resume_checkpoint(run: Run) -> str | None:
    """What `trainer.train(resume_from_checkpoint=...)` takes: the folder a --resume continues, else None."""
    return str(run.resumed_from) if run.resumed_from else None


class RunCallback(TrainerCallback):
    """Every Trainer log (train loss, learning rate, validation accuracy) becomes a row of metrics.jsonl and a
    printed line; a non-finite training loss stops the run (exit code 3); Ctrl-C makes the Trainer save a
    checkpoint at the end of the step and stop, and `raise_if_interrupted` then ends the run (exit code 130)."""

    def __init__(self, run: Run, names: dict[str, str] = LOG_NAMES):
        self.run, self.names = run, names
        self.interrupted_at: int | None = None  # the step after which a stop request stopped training
        run.watch_interrupts()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and not math.isfinite(logs["loss"]):
            raise self.run.diverged("loss", logs["loss"], step=state.global_step,
                                    epoch=max(1, math.ceil(state.epoch or 0)), checkpoint=self._newest_checkpoint(args))
        row = {self.names[k]: v for k, v in logs.items() if k in self.names}
        if len(row) > 1:  # more than the epoch: the end-of-training summary has none of these
            self.run.log(step=state.global_step, **row)
            print(f"step {state.global_step}: " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.any_rank(self.run.stop_requested):  # every process stops after the same step
            self.interrupted_at = state.global_step
            control.should_save = control.should_training_stop = True

    def raise_if_interrupted(self) -> None:
        """After `trainer.train()`: a stop request ends the run here, naming the checkpoint to resume from."""
        if self.interrupted_at is not None:
            folder = self.run.dir / "checkpoints"
            newest = get_last_checkpoint(folder) if folder.is_dir() else None
            raise self.run.interrupted(Path(newest) if newest else folder, step=self.interrupted_at)

    @staticmethod
    def _newest_checkpoint(args) -> Path | None:
        newest = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        return Path(newest) if newest else None
