"""Device selection and seeding: the two lines every recipe needs, written once."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch

from dlnotes.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
T = TypeVar("T")


def pick_device(name: str = "auto") -> torch.device:
    """`auto` prefers cuda, then mps, then cpu. Asking for a device that is not there is a user error."""
    name = name.lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise UserError(f"Unknown device '{name}': use one of {', '.join(DEVICES)}.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available here (try --device cpu).")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but Apple's MPS backend is not available here.")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator for data order so it is reproducible on its own."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    return torch.Generator().manual_seed(seed)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


def in_own_thread(work: Callable[[], T]) -> T:
    """work() in a new thread that ends with it; its result, or its exception raised here. OpenMP's worker
    threads belong to the thread that started them and outlive its parallel regions: started here, they end
    with this thread instead of idling beside the threads that run later (where libgomp, counting more of its
    threads than cores, cuts every thread's spinning to a few rounds)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:  # handed to the calling thread, which raises it
            outcome["error"] = err

    thread = threading.Thread(target=run, name="dlnotes-load", daemon=True)  # Ctrl-C does not wait for it
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count inside the block (0 keeps it), restored afterwards."""
    previous = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
