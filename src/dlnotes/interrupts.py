"""Ctrl-C as a stop request: the first one asks training to stop at the next step boundary, the second quits.

The training loop polls `requested` at each step boundary, writes a checkpoint and ends with
TrainingInterrupted; a second Ctrl-C raises KeyboardInterrupt at once (files are written durably, so
whatever it interrupts leaves no half-written file).
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class StopRequests:
    def __init__(self, announce: bool):
        self.requested = False
        self._announce = announce  # rank 0 alone prints
        self._previous: Any = None
        self._watching = False

    def watch(self) -> None:
        """Catch SIGINT from now on (only the main thread can install a handler; elsewhere Ctrl-C stays as is)."""
        if not self._watching and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._watching = True

    def release(self) -> None:
        """Give SIGINT back to whoever handled it before `watch`."""
        if self._watching and self._previous is not None:  # None: the handler was not installed from Python
            signal.signal(signal.SIGINT, self._previous)
        self._previous, self._watching = None, False

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        if self._announce:
            print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)",
                  file=sys.stderr, flush=True)
