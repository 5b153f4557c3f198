"""Errors the user can cause. The CLI prints them as one line and exits non-zero, never a traceback."""


class UserError(Exception):
    """A mistake the user can fix: a bad flag, a missing file, an unavailable device."""

    exit_code = 2


class DataError(UserError):
    """A data file is missing, incomplete or does not match its recorded checksum."""


class TrainingInterrupted(UserError):
    """Ctrl-C during training: a checkpoint was saved; the message says how to resume."""

    exit_code = 130


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""

    exit_code = 3
