"""Launch options: what a launch asks of a run (--resume, --save-every, --keep, ...), not what a recipe trains.

The launcher parses them and hands them to the run it starts through a context variable, together with the
recipe's catalog entry:

    with options.using(RunOptions(resume="runs/mlp/20260101-120000"), recipe=info):
        module.main(cfg)          # the Run made inside main() resumes that directory

Outside such a block a Run gets the defaults (a fresh run directory, checkpoints at each epoch end), so
`main(cfg)` called from a test behaves like `dlnotes run ID` without launch flags. No click in here: the run
tracking imports this module, never the command-line layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlnotes.catalog import RecipeInfo


# What a --resume may give anew (README "Interrupting and resuming", flags.RUN_OPTION_HELP["resume"]): a longer
# run, another device. --out is accepted so that a habitual --out does not fail; the run stays in its directory.
RESUMABLE_CHANGES = ("epochs", "total_steps", "device", "out")


@dataclass
class RunOptions:
    """Options of the launch itself, not of the recipe: the same for every recipe."""

    smoke: bool = False
    resume: str = ""  # a run directory to continue
    save_every: int = 0  # also checkpoint every N optimizer steps (every epoch end always checkpoints)
    keep: int = 1  # how many of the newest step checkpoints to keep (fasttext's are 190 MB each)
    nproc: int = 1  # processes on this machine (torchrun's --nproc-per-node)
    nnodes: int = 1  # machines in the job
    node_rank: int = 0  # this machine's index, 0 .. nnodes - 1
    rdzv_endpoint: str = ""  # HOST:PORT of node 0, where the processes meet

    explicit: frozenset[str] = frozenset()  # the Config fields given on the command line


@dataclass(frozen=True)
class Launch:
    """What the launcher knows that a Run needs: the options, and the catalog entry of the recipe started."""

    options: RunOptions
    recipe: RecipeInfo | None = None
    # The Runs started in this launch: whichever a recipe left open (it raised before `finish`) is closed when
    # the launch ends, so its signal handlers, lock file and TensorBoard writer do not outlive it.
    runs: list[Any] = field(default_factory=list)


_current: ContextVar[Launch | None] = ContextVar("dlnotes_launch", default=None)


@contextmanager
def using(options: RunOptions, recipe: RecipeInfo | None = None) -> Iterator[None]:
    """Runs started inside this block get `options` (and `recipe`'s catalog entry); afterwards, what was before.
    The block closes every Run started in it, however it ends."""
    launch = Launch(options, recipe)
    token = _current.set(launch)
    try:
        yield
    finally:
        _current.reset(token)
        for run in launch.runs:
            run.close()


def current_launch() -> Launch:
    """The launch in effect: the innermost `using(...)`, or the defaults outside any."""
    return _current.get() or Launch(RunOptions())  # fresh defaults each time: nobody shares a mutable one
