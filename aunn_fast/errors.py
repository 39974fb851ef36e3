"""The package's own exceptions: what it was given was wrong, as opposed to a bug inside it.

Each subclasses the built-in exception the API documents (ValueError, TypeError,
FileNotFoundError), so ``except ValueError`` keeps working; the command line reports
these (and only these) as one-line user errors with exit status 2. Any other exception
escaping a command is an internal error: it is printed with its traceback, exit status 1.
"""

from __future__ import annotations


class AUNNError(Exception):
    """Base of every error that is the caller's input, file or machine, never a bug of aunn_fast."""


class UserInputError(AUNNError, ValueError):
    """A value the caller passed is invalid: out of range, too large for this machine, inconsistent."""


class UserTypeError(AUNNError, TypeError):
    """A value the caller passed has the wrong type (e.g. float targets where token ids are expected)."""


class MissingFileError(UserInputError, FileNotFoundError):
    """A file the caller named does not exist."""


class MissingDependencyError(UserInputError, ImportError):
    """An optional dependency the request needs is not installed; the message says which extra brings it."""


class CheckpointError(UserInputError):
    """A checkpoint file cannot be used: unreadable, foreign, or inconsistent. The message names the
    file and the field."""

    def __init__(self, path: object, field: str, problem: str) -> None:
        self.path, self.field, self.problem = str(path), field, problem
        where = f"{self.path}: {field}" if field else self.path
        super().__init__(f"{where}: {problem}")


class RunDirectoryBusy(UserInputError):
    """Another process holds the lock of a run directory (see :mod:`aunn_fast.runlock`)."""


class TrainingDiverged(UserInputError):
    """The loss or the weights became non-finite; the run stopped without saving them."""


class ResourceError(UserInputError):
    """What was asked for needs more memory than the machine has (the estimate is in the message)."""
