"""Checkpoints: model state + config + metadata in one file, written atomically, read with weights_only=True.

`weights_only=True` means a checkpoint can only hold tensors and plain containers: a file with pickled code
in it is refused instead of run.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dlnotes import __version__
from dlnotes.errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1


def save_checkpoint(run_dir: Path, recipe: str, model: torch.nn.Module, config: Any, **extra: Any) -> Path:
    """Write `run_dir/checkpoint.pt` via a temporary file and an atomic rename, so a crash never leaves half a file."""
    path = Path(run_dir) / CHECKPOINT_NAME
    state = {
        "format": FORMAT,
        "recipe": recipe,
        "dlnotes_version": __version__,
        "config": asdict(config),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str | Path, recipe: str) -> dict[str, Any]:
    """Load and check a run's checkpoint; every way it can be wrong is one clear UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"Run directory {run_dir} does not exist.")
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"{run_dir} has no {CHECKPOINT_NAME}; did that run finish?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path} was refused: it holds more than weights (possibly code). Not loading it.") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt).") from err
    if not isinstance(state, dict) or "recipe" not in state or "model" not in state:
        raise UserError(f"{path} is not a dlnotes checkpoint.")
    if state["recipe"] != recipe:
        raise UserError(f"{run_dir} is a run of '{state['recipe']}', not '{recipe}'.")
    return state


def restore_config(config_class: type, state: dict[str, Any]) -> Any:
    """Rebuild the Config the run was trained with (fields added since then keep their defaults)."""
    known = {k: v for k, v in state["config"].items() if k in config_class.__dataclass_fields__}
    return config_class(**known)
