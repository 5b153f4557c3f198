"""Checkpoints: model state + config + metadata in one file, written durably, read with weights_only=True.

`weights_only=True` means a checkpoint can only hold tensors and plain containers: a file with pickled code
in it is refused instead of run.
"""

from __future__ import annotations

import io
import pickle
import random
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlnotes import __version__
from dlnotes.distributed import main_rank_only, unwrap
from dlnotes.durable import write_durably
from dlnotes.errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1


@main_rank_only
def save_checkpoint(run_dir: Path, recipe: str, model: torch.nn.Module, config: Any, **extra: Any) -> Path:
    """Write `run_dir/checkpoint.pt` durably (see `atomic_save`)."""
    return atomic_save(checkpoint_state(recipe, model, config, **extra), Path(run_dir) / CHECKPOINT_NAME)


def checkpoint_state(recipe: str, model: torch.nn.Module, config: Any, **extra: Any) -> dict[str, Any]:
    """What every checkpoint holds (final model or training state): format, recipe, version, config, weights."""
    return {
        "format": FORMAT,
        "recipe": recipe,
        "dlnotes_version": __version__,
        "config": asdict(config),
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        **extra,
    }


def atomic_save(state: dict[str, Any], path: Path) -> Path:
    """torch.save through `durable.write_durably`: a uniquely named temporary file in the same folder, fsynced and
    renamed over `path`. A second Ctrl-C, a full disk or a crash leaves the previous file whole and no
    temporary file behind."""
    # Serialized in memory first: torch.save turns an error of the file it writes to (a full disk) into an
    # opaque RuntimeError; a plain write of the bytes keeps the OSError that says what happened.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return write_durably(path, lambda file: file.write(buffer.getbuffer()))


def load_checkpoint(run_dir: str | Path, recipe: str) -> dict[str, Any]:
    """Load and check a run's checkpoint; every way it can be wrong is one clear UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"Run directory {run_dir} does not exist.")
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"{run_dir} has no {CHECKPOINT_NAME}; did that run finish?")
    return load_state_file(path, recipe)


def load_state_file(path: Path, recipe: str) -> dict[str, Any]:
    run_dir = path.parent if path.parent.name != "checkpoints" else path.parent.parent
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
    if state.get("format", 0) > FORMAT:
        raise UserError(f"{path} was written by a newer dlnotes (format {state['format']}); upgrade to load it.")
    return state


def load_weights(model: torch.nn.Module, state: dict[str, Any], key: str = "model") -> None:
    """load_state_dict with a clear error when the checkpoint was made for a differently shaped model."""
    try:
        unwrap(model).load_state_dict(state[key])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
        raise UserError(f"The checkpoint does not fit this model (another version or other flags?): {detail}") from err


# --- random number generators: everything a resumed run needs to continue the same sequence -----------------


def capture_rng(generator: torch.Generator | None) -> dict[str, Any]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state() if generator is not None else None,
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])


def restore_config(config_class: type, state: dict[str, Any]) -> Any:
    """Rebuild the Config the run was trained with (fields added since then keep their defaults)."""
    known = {k: v for k, v in state["config"].items() if k in config_class.__dataclass_fields__}
    return config_class(**known)
