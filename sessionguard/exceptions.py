"""
Exceptions and warnings raised by sessionguard.

The tree::

    Exception
     +-- SessionGuardError                 everything sessionguard raises
          +-- ConfigError (also ValueError) a bad configuration value or variable
          +-- StaleReadError                a stale read, with ``on_stale="raise"``

    UserWarning
     +-- SessionGuardWarning                a stale read or other finding, with
                                            ``on_stale="warn"``
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._findings import StaleRead

__all__ = [
    "ConfigError",
    "SessionGuardError",
    "SessionGuardWarning",
    "StaleReadError",
]


class SessionGuardError(Exception):
    """The root of every exception that sessionguard raises."""


class ConfigError(SessionGuardError, ValueError):
    """
    A configuration value, keyword argument or environment variable is invalid.

    The message names the setting, the value that was given and the values that
    are accepted.
    """


class StaleReadError(SessionGuardError):
    """
    An object was served from the identity map although its row had changed.

    Raised at the read when the guard's ``on_stale`` is ``"raise"``. The
    finding is available as :attr:`finding`.
    """

    finding: StaleRead

    def __init__(self, finding: StaleRead) -> None:
        self.finding = finding
        super().__init__(finding.describe())


class SessionGuardWarning(UserWarning):
    """Emitted for findings when the guard's ``on_stale`` is ``"warn"``."""
