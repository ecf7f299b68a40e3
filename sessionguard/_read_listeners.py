"""
Reads: the ``do_orm_execute`` listener (the hot path) and the answers to the
process-wide read hooks of ``_stale`` (ORM statements' objects, identity
lookups).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from . import _stale
from ._context import current_request
from ._core import fail_open
from ._transaction_listeners import TransactionListeners

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Mapper, ORMExecuteState

__all__ = ["ReadListeners"]


class ReadListeners(TransactionListeners, _stale.ReadObserver):
    """What a guard does for every ORM statement and identity-map read."""

    @fail_open
    def _do_orm_execute(self, orm_state: ORMExecuteState) -> None:
        # The hot path: every ORM statement. It only counts and looks; the
        # objects a statement returns are checked by the read hook in _stale
        # as SQLAlchemy makes them. Returning a result from here would change
        # how SQLAlchemy runs the statement, so nothing is ever returned.
        if not self._count_statement(orm_state):
            return
        if orm_state.is_update or orm_state.is_delete:
            # Writes are few and not sampled: a skipped one would go unseen.
            # text() DML is checked in _before_core_execute, which sees it
            # whether it ran through session.execute() or session.connection().
            self._check_orm_dml(orm_state)

    def _count_statement(self, orm_state: ORMExecuteState) -> bool:
        """Count the statement; whether detection is on for it."""
        session = orm_state.session
        if self._target.engine_scoped and not self._on_engine(
            self._statement_bind(orm_state)
        ):
            return False
        state = self._sessions.get(session) or self._state(session)
        state.statements += 1
        self._counters.add("statements")
        size = len(session.identity_map)
        state.max_identity_map_size = max(state.max_identity_map_size, size)
        if current_request() is not None:
            self._check_request(session, state)
        return self._detect

    @staticmethod
    def _statement_bind(orm_state: ORMExecuteState) -> Engine | Connection:
        """Where the statement will run, asking get_bind() only when needed."""
        session = orm_state.session
        arguments = orm_state.bind_arguments
        bind = arguments.get("bind")
        if bind is not None:
            return bind  # type: ignore[no-any-return]
        # A session with one bind answers without calling get_bind(), which
        # a subclass may override (sharding chooses a shard there).
        if (
            session.bind is not None
            and type(session).get_bind is Session.get_bind
            # the per-mapper/table binds: .binds on 2.1, private on 2.0
            and not getattr(session, "binds", getattr(session, "_Session__binds", 1))
        ):
            return session.bind
        return session.get_bind(**arguments)

    @fail_open
    def covers_lookup(self, session: Session, mapper: Mapper[Any]) -> bool:
        if not self._installed or not self._target.covers(session):
            return False
        if self._target.engine_scoped and not self._on_engine(
            session.get_bind(mapper=mapper)
        ):
            return False
        if current_request() is not None:
            self._check_request(session, self._state(session))
        if not self._detect:
            return False
        return self._sample_rate >= 1.0 or self._random.random() < self._sample_rate

    @fail_open
    def identity_hit(self, session: Session, hit: _stale.Hit) -> None:
        self._check(session, [hit], raise_stale=True)

    @fail_open
    def covers_statement(self, session: Session, connection: Connection) -> bool:
        # Sampling first: an unsampled statement costs one random number.
        if not self._detect or (
            self._sample_rate < 1.0 and self._random.random() >= self._sample_rate
        ):
            return False
        if not self._installed or not self._target.covers(session):
            return False
        return not self._target.engine_scoped or self._on_engine(connection)

    @fail_open
    def statement_hits(self, session: Session, hits: list[_stale.Hit]) -> None:
        self._check(session, hits, raise_stale=True)
