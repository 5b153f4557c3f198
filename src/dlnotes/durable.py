"""Durable writes: a file a run writes is either the old version or the whole new one, never half of either.

Every run file that is rewritten (checkpoints, config.json, summary.json, metrics.jsonl on resume) goes
through `write_durably`: the bytes go to a temporary file with a unique name in the same folder, are flushed
and fsynced, the temporary file is renamed over the target (`os.replace`, atomic on one file system), and
the folder is fsynced so the rename itself survives a power cut. Whatever interrupts the write (a second
Ctrl-C, a full disk, a crash in the serializer) removes the temporary file before the error goes on; an
OSError (ENOSPC, EDQUOT, EROFS, ...) goes on as a one-line UserError naming the file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dlnotes.errors import UserError


def write_durably(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(file)` on a temporary file next to `path`, then make it `path` in one atomic step.

    A stop signal's exception can arrive between any two lines of Python, so the temporary file's name is known
    before the file exists (tempfile.mkstemp creates the file and only then, in Python, returns its name) and
    it is created by one system call inside the `try` that removes it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except FileExistsError as err:  # another writer's temporary file has this name (48 random bits): not ours
        raise UserError(f"Cannot write {path}: {tmp} exists.") from err
    except BaseException as err:  # KeyboardInterrupt too: the second Ctrl-C must not leave its temporary file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):  # a full disk, a quota, a read-only mount: the user's to fix, in one line
            raise UserError(f"Cannot write {path}: {err.strerror or err}.") from err
        raise
    _fsync_folder(path.parent)
    return path


def write_text_durably(path: Path, text: str) -> Path:
    return write_durably(path, lambda file: file.write(text.encode("utf-8")))


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable. Folders cannot be opened for fsync on every platform (Windows): skip there."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
