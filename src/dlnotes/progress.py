"""Training progress: a live bar on a terminal, a plain line every few seconds in logs; samples/s; epoch means.

`Progress.steps` yields the items of one pass and calls `after_step()` at each step boundary (the Run decides
what happens there). `update` counts samples and sums the values shown, on the device, so `epoch_mean`
reads each sum once; in a multi-process run the sums of all ranks are added up. A loss that is not finite is
noted here (`nonfinite`); the Run acts on it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from dlnotes import distributed
from dlnotes.runfiles import plain

T = TypeVar("T")
PLAIN_PROGRESS_EVERY_S = 10.0  # without a terminal, one progress line this often keeps CI logs readable


class Progress:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.samples_per_s = 0.0
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.nonfinite: tuple[str, float] | None = None  # the first loss that was NaN or infinite, and its value
        self._samples = 0
        self._live: dict[str, Any] = {}

    def new_epoch(self) -> None:
        self.sums, self.counts = {}, {}

    def continue_epoch(self, sums: dict[str, Any], counts: dict[str, int]) -> None:
        """A resumed run goes on with the interrupted epoch's sums, so its means are those of the whole epoch."""
        self.sums, self.counts = sums, counts

    def steps(self, iterable: Iterable[T], total: int, desc: str, done: int,
              after_step: Callable[[], None]) -> Iterator[T]:
        """Yield from `iterable` (whose first `done` steps were skipped already), showing progress."""
        self._samples, self._live = 0, {}
        start = time.perf_counter()
        try:
            if sys.stdout.isatty():
                yield from self._rich(iterable, total, desc, start, done, after_step)
            else:
                yield from self._plain(iterable, total, desc, start, done, after_step)
        finally:  # also when the loop breaks early (e.g. dqn stops once solved)
            self.samples_per_s = self._samples / max(time.perf_counter() - start, 1e-9)

    def _plain(self, iterable: Iterable[T], total: int, desc: str, start: float, done: int,
               after_step: Callable[[], None]) -> Iterator[T]:
        last_print, shown, i = start, done, done
        try:
            for i, item in enumerate(iterable, 1 + done):
                yield item
                after_step()
                now = time.perf_counter()
                if now - last_print >= PLAIN_PROGRESS_EVERY_S or i == total:
                    last_print, shown = now, i
                    print(f"{desc} {i}/{total} {self._status(now - start)}", flush=True)
        finally:
            if shown != i:
                print(f"{desc} {i}/{total} {self._status(time.perf_counter() - start)}", flush=True)

    def _rich(self, iterable: Iterable[T], total: int, desc: str, start: float, done: int,
              after_step: Callable[[], None]) -> Iterator[T]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}"))
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(desc, total=total, status="", completed=done)
            last_shown = start
            for item in iterable:
                yield item
                after_step()
                now = time.perf_counter()
                status = None
                if now - last_shown > 0.25:  # reading a CUDA loss forces a sync: do it a few times a second only
                    last_shown, status = now, self._status(now - start)
                bar.update(task, advance=1, **({"status": status} if status else {}))
            bar.update(task, status=self._status(time.perf_counter() - start))

    def update(self, samples: int, **values: Any) -> None:
        """Count samples, show `values` in the progress line, sum them for `epoch_mean`; note a non-finite loss."""
        self._samples += samples
        self._live = values
        for key, value in values.items():
            if value is None:
                continue
            self.sums[key] = self.sums.get(key, 0.0) + (value.detach() if hasattr(value, "detach") else value)
            self.counts[key] = self.counts.get(key, 0) + 1
            if "loss" in key and self.nonfinite is None and not math.isfinite(float(plain(value))):
                self.nonfinite = (key, float(plain(value)))

    def epoch_mean(self, key: str) -> float:
        """Mean of `key` over this epoch's updates (summed on the device, read once here), over all ranks."""
        total = self.sums[key]
        if self.world_size > 1:  # every rank calls this at the same point: add up all ranks' sums
            import torch

            total = distributed.all_sum(total.clone() if hasattr(total, "clone") else torch.tensor(float(total)))
        return float(plain(total)) / max(self.counts.get(key, 0) * self.world_size, 1)

    def _status(self, elapsed: float) -> str:
        parts = [f"{k} {plain(v):.4f}" for k, v in self._live.items()]
        parts.append(f"{self._samples / max(elapsed, 1e-9):,.0f} samples/s")
        return "  ".join(parts)
