"""The one error type tckr reports to a user, and its warnings.

Every failure a user can fix (bad configuration, unusable data, a server that does not answer) raises a
subclass of :class:`TckrError`; the CLI catches that one type and prints its message as one line, with
the subclass's exit code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

FAILURE_FILE_ENV = "TCKR_FAILURE_FILE"
"""Set by ``tckr run``: where a failing task writes its one-line error, so the run can end with it (kfp.local
shows a task's failure only as a traceback in the middle of the log)."""


def warn(message: str) -> None:
    """Data or settings that are legal but make some figures mean less than they seem: the run goes on, and the
    user reads why on one line (``tckr: warning: ...``) wherever the stage runs (a terminal, a pod's log)."""
    print(f"tckr: warning: {message}", file=sys.stderr, flush=True)


def record_failure(error: Exception) -> None:
    """Append the error's one line to the run's failure file, when the task runs under ``tckr run`` (which
    names the stage itself)."""
    path = os.environ.get(FAILURE_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as failures:
            failures.write(f"{error}\n")


class TckrError(Exception):
    """A failure the message explains, with what to change."""

    exit_code = 1


class ConfigError(TckrError, ValueError):
    """A profile, override or value that cannot make a valid configuration."""

    exit_code = 2


class DeviceError(TckrError, RuntimeError):
    """The requested device (or number of devices) is not there."""
