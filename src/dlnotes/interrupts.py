"""Stop signals as stop requests: the first one asks training to stop at the next step boundary, the second quits.

Ctrl-C (SIGINT), SIGTERM (what Slurm, Kubernetes, systemd and `timeout` send) and SIGUSR1 (Slurm's
`--signal=USR1@SECONDS` warning before the time limit) all act the same: the training loop polls `requested`
at each step boundary, writes a checkpoint and ends with TrainingInterrupted, whose exit code is 128 + the
signal's number (130, 143, 138), as a shell reports a process ended by that signal. A second signal raises
`StopNow` (a KeyboardInterrupt) at once; files are written durably, so whatever it interrupts leaves no
half-written file.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}


class StopNow(KeyboardInterrupt):
    """The second stop signal: quit at once, with exit code 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(NAMES.get(signum, str(signum)))
        self.exit_code = 128 + signum


class StopRequests:
    def __init__(self, announce: bool):
        self.requested = False
        self.quit: StopNow | None = None  # the second signal's StopNow, once raised (a framework may swallow it)
        self.signum = signal.SIGINT  # which signal asked: it sets the exit code
        self._announce = announce  # rank 0 alone prints
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def watch(self) -> None:
        """Catch the stop signals from now on (only the main thread can install handlers; elsewhere they stay)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            current = signal.signal(signum, self._on_signal)
            self._previous.setdefault(signum, current)  # whoever had it before this object first watched

    def release(self) -> None:
        """Give each signal back to whoever handled it before `watch`, wherever this object's handler is in place:
        also where a framework that saved it while running (Lightning does) put it back after it was released."""
        for signum, previous in self._previous.items():
            if previous is not None and signal.getsignal(signum) == self._on_signal:  # None: not set from Python
                signal.signal(signum, previous)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second signal: stop now
            self.release()
            self.quit = StopNow(signum)
            raise self.quit
        self.requested, self.signum = True, signum
        if self._announce:
            again = "Ctrl-C again" if signum == signal.SIGINT else "send it again"
            print(f"\n{NAMES[signum]}: stopping after this step and saving a checkpoint ({again} to quit at once)",
                  file=sys.stderr, flush=True)
