"""The public surface is exactly __all__, sorted, with the design's names."""

from __future__ import annotations

import sessionguard

DESIGN_NAMES = {
    "install_guard",
    "install_from_env",
    "Guard",
    "GuardConfig",
    "GuardStats",
    "StaleRead",
    "AttributeDiff",
    "Finding",
    "request_context",
    "SessionGuardError",
    "ConfigError",
    "StaleReadError",
}


def test_all_is_sorted_and_complete():
    """__all__ is sorted and holds every name the design makes public."""
    assert sessionguard.__all__ == sorted(sessionguard.__all__)
    assert set(sessionguard.__all__) >= DESIGN_NAMES


def test_public_members_are_exactly_all():
    """Every public attribute of the package is in __all__ and vice versa."""
    public = {
        name
        for name, value in vars(sessionguard).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("sessionguard")
    }
    public |= {"__version__"}
    assert public == set(sessionguard.__all__)


def test_exception_tree():
    """ConfigError is a SessionGuardError and a ValueError; StaleReadError a SessionGuardError."""
    assert issubclass(sessionguard.ConfigError, sessionguard.SessionGuardError)
    assert issubclass(sessionguard.ConfigError, ValueError)
    assert issubclass(sessionguard.StaleReadError, sessionguard.SessionGuardError)
    assert issubclass(sessionguard.SessionGuardWarning, UserWarning)
