"""What a guard reports: immutable finding records, with no behaviour of their own."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import uuid
from typing import Any, ClassVar

__all__ = [
    "REDACTED",
    "AttributeDiff",
    "CrossThread",
    "Finding",
    "SharedSession",
    "StaleRead",
    "UnsynchronizedWrite",
    "render_key",
]

REDACTED = "<redacted>"
"""What stands in for an attribute value that may not leave the process."""

_FIX = (
    "expire the session before reading (session.expire_all()), load with "
    "execution_options(populate_existing=True), keep expire_on_commit=True, or "
    "install the guard with expire={'request'} so each request starts fresh"
)


def _plain(value: Any) -> Any:
    """*value* as JSON has it: UUIDs and decimals as strings, dates in ISO format."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


def render_key(identity: Any) -> str:
    """
    A primary key as humans read it everywhere: ``6f1c...`` or ``(1, 2)``.

    ``str()`` of each part's JSON form, so the exception, the summary and a
    JSON report read back print a key the same way.
    """
    parts = list(identity) if isinstance(identity, (tuple, list)) else [identity]
    texts = [str(_plain(part)) for part in parts]
    return texts[0] if len(texts) == 1 else "(" + ", ".join(texts) + ")"


def describe_attributes(names: list[str], deleted: bool = False) -> str:
    """``attribute `name` differs from the database row``, plural for several."""
    if deleted:
        return "its row no longer exists"
    if len(names) == 1:
        return f"attribute {names[0]} differs from the database row"
    return f"attributes {', '.join(names)} differ from the database row"


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
        """A dict of ``kind`` and every field, JSON-native (UUIDs, dates as strings)."""
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
    """The primary key tuple (``to_dict()`` makes each part JSON-native)."""

    deleted: bool = False
    """The row no longer exists for the session's transaction."""

    attributes: tuple[AttributeDiff, ...] = ()
    """Loaded, unmodified attributes whose cached value differs from the row."""

    @property
    def subject(self) -> str:
        """The object as humans read it: the entity, then its key (``User 6f1c...``)."""
        return f"{self.entity} {render_key(self.identity)}"

    def describe(self) -> str:
        """One paragraph for an exception message or a test failure."""
        where = f" at {self.location}" if self.location else ""
        what = describe_attributes(
            [_describe_diff(diff) for diff in self.attributes], self.deleted
        )
        return (
            f"stale read of {self.subject}{where}: the object came from the "
            f"session's identity map, but {what}. Fix: {_FIX}."
        )


def _describe_diff(diff: AttributeDiff) -> str:
    if diff.cached == REDACTED and diff.current == REDACTED:
        return f"`{diff.name}`"
    return (
        f"`{diff.name}` (cached {_plain(diff.cached)!r}, "
        f"database {_plain(diff.current)!r})"
    )


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
