"""
sessionguard: see and prevent stale reads from SQLAlchemy's identity map.

::

    from sessionguard import install_guard

    guard = install_guard(engine, on_stale="raise", expire={"request"})
"""

from __future__ import annotations

from ._config import GuardConfig
from ._context import request_context
from ._findings import (
    AttributeDiff,
    CrossThread,
    Finding,
    SharedSession,
    StaleRead,
    UnsynchronizedWrite,
)
from ._guard import Guard, GuardStats, install_from_env, install_guard
from ._version import __version__
from .exceptions import (
    ConfigError,
    SessionGuardError,
    SessionGuardWarning,
    StaleReadError,
)

__all__ = [
    "AttributeDiff",
    "ConfigError",
    "CrossThread",
    "Finding",
    "Guard",
    "GuardConfig",
    "GuardStats",
    "SessionGuardError",
    "SessionGuardWarning",
    "SharedSession",
    "StaleRead",
    "StaleReadError",
    "UnsynchronizedWrite",
    "__version__",
    "install_from_env",
    "install_guard",
    "request_context",
]
