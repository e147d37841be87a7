"""What the user can fix, as exceptions: run.py prints them as one line and exits 1 (the traceback only with
HYDRA_FULL_ERROR=1, as Hydra does; fusion_bench/entry.py).

- ConfigError: an option of the resolved config, or a file an option names (finetuned_from, model.pretrained),
  is not what it must be. The message names the option (or the file and its task), the value given and what it
  must be. Refused before any work by the validation pass (fusion_bench/validation) or, for a user's file, before
  it enters the store.
- DiskFullError: no space left on the device a file was written to; the message names the file.

Both are Hydra `CompactHydraException`s: a failed job of a sweep is reported by Hydra as its message alone.
"""

from __future__ import annotations

import errno

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """An error the user can fix from its message alone: printed as one line, without a traceback."""


class ConfigError(UserError, ValueError, TypeError):
    """A config option (or a file it names) that is not what it must be. Both a ValueError and a TypeError, so
    callers that caught either from the checks before this class existed still do."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A file or folder an option names does not exist."""


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights found in none of the places looked (the message lists them and the ways to provide
    them); never a silent random init."""


class DiskFullError(UserError, OSError):
    """No space left on the device while a file was written (errno ENOSPC); nothing partial was kept."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message of several lines is joined with ' | ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " | ".join(lines) or type(error).__name__
