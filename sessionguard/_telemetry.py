"""
Turns what the guard observes into structlog events (and counters).

This is the only module that knows about logging. The detector hands it
findings; the guard's listeners hand it transaction boundaries.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from ._config import GuardConfig
    from ._findings import Finding

__all__ = ["Telemetry"]


class Telemetry:
    """The sinks of one guard: its structlog logger."""

    __slots__ = ("_lock", "log")

    def __init__(self, config: GuardConfig) -> None:
        self.log: Any = (
            config.logger
            if config.logger is not None
            else structlog.get_logger("sessionguard")
        )
        self._lock = threading.Lock()

    def transaction_begun(self, session_id: int, identity_map_size: int) -> None:
        self.log.debug(
            "session.begin", session_id=session_id, identity_map_size=identity_map_size
        )

    def transaction_ended(
        self,
        session_id: int,
        outcome: str,
        identity_map_size: int,
        statements: int,
        duration_s: float,
    ) -> None:
        self.log.debug(
            f"session.{outcome}",
            session_id=session_id,
            identity_map_size=identity_map_size,
            statements=statements,
            duration_ms=round(duration_s * 1000.0, 3),
        )

    def expired(
        self, session_id: int, reason: str, objects: int, kept_modified: int
    ) -> None:
        self.log.debug(
            "expire_all",
            session_id=session_id,
            reason=reason,
            objects=objects,
            kept_modified=kept_modified,
        )

    def finding(self, finding: Finding) -> None:
        fields = finding.to_dict()
        event = fields.pop("kind")
        self.log.warning(event, **fields)

    def verification_error(
        self, session_id: int, entity: str, error: BaseException
    ) -> None:
        self.log.error(
            "verification_error",
            session_id=session_id,
            entity=entity,
            error=f"{type(error).__name__}: {error}",
        )
