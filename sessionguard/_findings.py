"""What a guard reports: immutable finding records, with no behaviour of their own."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

__all__ = [
    "REDACTED",
    "AttributeDiff",
    "CrossThread",
    "Finding",
    "SharedSession",
    "StaleRead",
    "UnsynchronizedWrite",
]

REDACTED = "<redacted>"
"""What stands in for an attribute value that may not leave the process."""

_FIX = (
    "expire the session before reading (session.expire_all()), load with "
    "execution_options(populate_existing=True), keep expire_on_commit=True, or "
    "install the guard with expire={'request'} so each request starts fresh"
)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Finding:
    """Something a guard noticed. Subclasses add what is specific to their kind."""

    kind: ClassVar[str] = "finding"

    session_id: int
    """The session's ``hash_key``: stable for the session's lifetime."""

    location: str | None = None
    """``file:line`` of the first frame outside SQLAlchemy and sessionguard."""

    request_id: str | None = None
    """The :func:`~sessionguard.request_context` active at the time, if any."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with ``kind`` and every field."""
        data: dict[str, Any] = {"kind": self.kind}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "attributes":
                data[field.name] = [diff.to_dict() for diff in value]
            else:
                data[field.name] = _plain(value)
        return data


@dataclasses.dataclass(frozen=True)
class AttributeDiff:
    """One attribute whose cached value differs from the database row."""

    name: str
    cached: Any = REDACTED
    current: Any = REDACTED

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cached": _plain(self.cached),
            "current": _plain(self.current),
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class StaleRead(Finding):
    """An object served from the identity map whose row had changed or vanished."""

    kind: ClassVar[str] = "stale_read"

    entity: str
    """The mapped class name."""

    identity: tuple[Any, ...]
    """The primary key tuple."""

    deleted: bool = False
    """The row no longer exists for the session's transaction."""

    attributes: tuple[AttributeDiff, ...] = ()
    """Loaded, unmodified attributes whose cached value differs from the row."""

    def describe(self) -> str:
        """One paragraph for an exception message or a test failure."""
        where = f" at {self.location}" if self.location else ""
        if self.deleted:
            what = "its row no longer exists"
        else:
            what = "attributes " + ", ".join(
                _describe_diff(diff) for diff in self.attributes
            )
            what += " differ from the database row"
        return (
            f"stale read of {self.entity} identity={self.identity!r}{where}: "
            f"the object came from the session's identity map, but {what}. "
            f"Fix: {_FIX}."
        )


def _describe_diff(diff: AttributeDiff) -> str:
    if diff.cached == REDACTED and diff.current == REDACTED:
        return diff.name
    return f"{diff.name} (cached {diff.cached!r}, database {diff.current!r})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnsynchronizedWrite(Finding):
    """A write bypassed the session while its table had objects in the identity map."""

    kind: ClassVar[str] = "unsynchronized_write"

    table: str
    """The table written to."""

    statement: str
    """``text``, ``orm_update``, ``orm_delete`` or ``core``: how the write was made."""

    entities: tuple[str, ...] = ()
    """Mapped classes of that table with objects in the identity map."""

    objects: int = 0
    """How many such objects were in the identity map."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SharedSession(Finding):
    """One session used in two request contexts."""

    kind: ClassVar[str] = "shared_session"

    previous_request_id: str | None = None
    """The request context the session was used in before."""

    pending_objects: int = 0
    """Objects with unflushed changes that kept the session from being expired."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrossThread(Finding):
    """One session transaction used from two threads."""

    kind: ClassVar[str] = "cross_thread"

    first_thread: str
    """The thread that began the transaction."""

    other_thread: str
    """The thread that used it afterwards."""
