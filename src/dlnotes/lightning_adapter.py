"""A Lightning Trainer inside a dlnotes run: metrics, checkpoints, Ctrl-C, --resume, progress, NaN guard.

Lightning runs its own loop and restores it from its own checkpoint dict (weights, optimizer, loop position,
callbacks' and data loaders' states). A recipe wires the run in with four calls:

    run = Run(__file__, cfg, device)
    callback = lightning_adapter.RunCallback(run, cfg)
    trainer = L.Trainer(max_epochs=cfg.epochs, **callback.trainer_arguments(device))
    callback.fit(trainer, module, lightning_adapter.EpochBatches(...))  # trainer.fit, resumed, Ctrl-C as below

What goes where, Lightning's own hooks pointed at the run:
- `self.log(...)` in the LightningModule -> `RunLogger` (a Lightning Logger) -> `run.log`: metrics.jsonl and
  TensorBoard in the run directory, as for every recipe.
- checkpoints -> `checkpoints/last-<step>.pt` (every epoch, every --save-every steps, on Ctrl-C; the newest
  --keep are kept) and `best.pt` (the recipe's target metric). `RunCheckpointIO` (a Lightning CheckpointIO)
  stores Lightning's dict inside the house's checkpoint format, so they load with `weights_only=True`, are
  checked to belong to the recipe, and `--resume` finds them like any recipe's; `ckpt_path` restores the loop.
- Ctrl-C -> the run's stop request; the callback saves after the current step and stops the Trainer, and the
  run ends with exit code 130 naming the checkpoint (Lightning's own handler would exit with code 1 and no
  checkpoint). A second Ctrl-C quits at once with 130 too: Lightning turns any KeyboardInterrupt into
  `sys.exit(1)`, so `fit` gives the run's own exit code back.
- progress: Lightning's bar on a terminal, the house's plain line every 10 s otherwise.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dlnotes import __version__
from dlnotes.checkpoint import FORMAT, atomic_save, capture_rng, load_state_file, restore_rng
from dlnotes.datasets import batch_indices, epoch_generator
from dlnotes.errors import TrainingDiverged, TrainingInterrupted, UserError
from dlnotes.tracking import Run

PLAIN_PROGRESS_EVERY_S = 10.0  # without a terminal, one progress line this often, as in every recipe
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: False" banner
# Lightning's own use of a torch API that newer torch deprecates: nothing a user of the recipe can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def resume_checkpoint(run: Run) -> str | None:
    """What `trainer.fit(ckpt_path=...)` takes: the newest last-<step>.pt of a --resume, else None."""
    found = sorted((run.dir / "checkpoints").glob("last-*.pt")) if run.options.resume else []
    return str(found[-1]) if found else None


class EpochBatches:
    """In-memory batches of `tensors` in the house's data order: each epoch's order depends only on (seed, epoch),
    as in the plain loops, so both trainers see the same batches. `RunCallback` calls `set_epoch` at each epoch
    start; Lightning saves `state_dict` in its checkpoints, so a run resumed mid-epoch continues the same order."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int = 0, limit: int = 0,
                 shuffle: bool = True) -> None:
        self.tensors, self.batch_size, self.seed, self.limit, self.shuffle = tensors, batch_size, seed, limit, shuffle
        self.epoch, self.done = 0, 0  # Lightning's epochs count from 0; batches of this epoch already yielded
        self._skip = 0  # set by a mid-epoch checkpoint: batches the resumed epoch already trained on

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(batch_indices(len(self.tensors[0]), self.batch_size, limit=self.limit, shuffle=False))

    def __iter__(self):
        order = epoch_generator(self.seed, self.epoch + 1) if self.shuffle else None
        batches = batch_indices(len(self.tensors[0]), self.batch_size, order, shuffle=self.shuffle, limit=self.limit)
        skip, self._skip = self._skip, 0
        for i, batch in enumerate(batches):
            if i >= skip:
                self.done = i + 1
                idx = batch.to(self.tensors[0].device)
                yield tuple(t[idx] for t in self.tensors)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "done": self.done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip = state["epoch"], state["done"]


class RunLogger(Logger):
    """Lightning's `self.log` values -> `run.log` rows (`step`, 1-based `epoch`, the values)."""

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run = run

    @property
    def name(self) -> str:
        return self.run.recipe

    @property
    def version(self) -> str:
        return self.run.dir.name

    @property
    def save_dir(self) -> str:
        return str(self.run.dir)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        epoch = metrics.pop("epoch", None)
        self.run.log(step=step, **({"epoch": int(epoch) + 1} if epoch is not None else {}), **metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the Config is in config.json already


class RunCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint dict inside the house's format: recipe, config, weights as "model", and the rows
    of metrics.jsonl logged so far (a resume drops the later ones, which the loop logs again)."""

    def __init__(self, run: Run, config: Any) -> None:
        self.run, self.config = run, config

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        state = {"format": FORMAT, "recipe": self.run.recipe, "dlnotes_version": __version__,
                 "config": asdict(self.config), "model": checkpoint["state_dict"],
                 "metrics_rows": len(self.run.history),
                 "lightning": {k: v for k, v in checkpoint.items() if k != "state_dict"}}
        atomic_save(state, Path(path))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        state = load_state_file(Path(path), self.run.recipe)  # weights_only=True, checked to be this recipe's
        return {**state["lightning"], "state_dict": state["model"]}

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)


class RunCallback(L.Callback):
    """Checkpoints (every epoch, --save-every, best.pt, on Ctrl-C), the NaN guard, plain progress lines, and the
    RNG states Lightning does not save (a VAE's sampling noise must continue the same after a resume)."""

    def __init__(self, run: Run, config: Any) -> None:
        self.run, self.config = run, config
        self.interrupted: tuple[int, Path] | None = None  # (step, checkpoint) when a stop request stopped training
        self.samples_per_s, self._best = 0.0, None
        self._samples, self._started, self._shown = 0, None, 0.0
        run.watch_interrupts()  # Ctrl-C now only sets run.stop_requested

    def trainer_arguments(self, device: torch.device, steps_per_epoch: int) -> dict[str, Any]:
        """Everything L.Trainer needs to run inside the run directory; the training loss is logged every 25
        steps (at least once an epoch)."""
        return {"accelerator": {"cuda": "gpu"}.get(device.type, device.type), "devices": 1,
                "logger": RunLogger(self.run), "callbacks": [self], "plugins": [RunCheckpointIO(self.run, self.config)],
                "default_root_dir": str(self.run.dir), "enable_checkpointing": False, "enable_model_summary": False,
                "enable_progress_bar": sys.stdout.isatty(), "num_sanity_val_steps": 0,
                "log_every_n_steps": max(1, min(25, steps_per_epoch))}

    def save(self, trainer: L.Trainer, name: str = "") -> Path:
        folder = self.run.dir / "checkpoints"
        folder.mkdir(exist_ok=True)
        path = folder / (name or f"last-{trainer.global_step:08d}.pt")
        trainer.save_checkpoint(path)
        if not name:
            for old in sorted(folder.glob("last-*.pt"))[: -max(self.run.options.keep, 1)]:
                old.unlink()
        return path

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.train_dataloader, EpochBatches):  # before the epoch draws its first batch
            trainer.train_dataloader.set_epoch(trainer.current_epoch)
        self._samples, self._started = 0, None  # the clock starts at the first batch (also of a resumed epoch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        step = trainer.global_step
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at step {step} (epoch {trainer.current_epoch + 1}); "
                                   f"training stopped. Try a lower learning rate than --lr {self.config.lr}.")
        self._samples += len(batch[0])
        now = time.perf_counter()
        if self._started is None:
            self._started = self._shown = now
        self.samples_per_s = self._samples / max(now - self._started, 1e-9)
        last = batch_idx + 1 == trainer.num_training_batches
        if not sys.stdout.isatty() and (now - self._shown >= PLAIN_PROGRESS_EVERY_S or last):
            self._shown = now
            print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {batch_idx + 1}/"
                  f"{trainer.num_training_batches} loss {loss:.4f}  {self.samples_per_s:,.0f} samples/s", flush=True)
        if self.run.stop_requested:
            self.interrupted = (step, self.save(trainer))
            trainer.should_stop = True
        elif self.run.options.save_every and step % self.run.options.save_every == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.interrupted:
            return
        self.save(trainer)
        target = self.run.target
        if target and target.metric in trainer.callback_metrics:
            value = float(trainer.callback_metrics[target.metric])
            if target.better(value, self._best):
                self._best = value
                self.save(trainer, "best.pt")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["dlnotes_rng"] = capture_rng(None)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if checkpoint["epoch"] + 1 > trainer.max_epochs:
            raise UserError(f"--epochs {trainer.max_epochs} is fewer than the {checkpoint['epoch'] + 1} epochs "
                            f"{self.run.dir} has trained; give at least that many.")
        restore_rng(checkpoint["dlnotes_rng"], None)
        print(f"resuming {self.run.dir} at step {checkpoint['global_step']} (epoch {checkpoint['epoch'] + 1})",
              flush=True)

    def fit(self, trainer: L.Trainer, module: L.LightningModule, *loaders: Any) -> None:
        """`trainer.fit` from the run's newest checkpoint (or the start), then the run's end after a stop signal:
        the first ends the run with 128 + its number (130 for Ctrl-C), naming the checkpoint; a second quits with
        that code at once, where Lightning would exit with 1."""
        try:
            trainer.fit(module, *loaders, ckpt_path=resume_checkpoint(self.run))
        except SystemExit:
            if self.run.quit_at_once is None:
                raise
            raise self.run.quit_at_once from None
        self.raise_if_interrupted()

    def raise_if_interrupted(self) -> None:
        """After `trainer.fit`: a stop request ends the run here (exit code 130), naming the checkpoint."""
        if self.interrupted:
            step, path = self.interrupted
            self.run.close()
            raise TrainingInterrupted(f"Interrupted at step {step}; saved {path}. "
                                      f"Resume with: dlnotes run {self.run.recipe} --resume {self.run.dir}")
