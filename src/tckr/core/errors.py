"""The one error type tckr reports to a user.

Every failure a user can fix (bad configuration, unusable data, a server that does not answer) raises a
subclass of :class:`TckrError`; the CLI catches that one type and prints its message as one line, with
the subclass's exit code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TckrError(Exception):
    """A failure the message explains, with what to change."""

    exit_code = 1


class ConfigError(TckrError, ValueError):
    """A profile, override or value that cannot make a valid configuration."""

    exit_code = 2


class DeviceError(TckrError, RuntimeError):
    """The requested device (or number of devices) is not there."""
