"""Session transaction listeners: begin, commit, rollback, and their telemetry."""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING

from ._connection_listeners import ConnectionListeners
from ._core import SessionState, fail_open

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["TransactionListeners"]


class TransactionListeners(ConnectionListeners):
    """The session's ``after_begin``, ``after_commit``, ``after_rollback`` and
    ``after_transaction_end``."""

    @fail_open
    def _after_begin(
        self, session: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        if transaction.parent is not None:
            return  # a SAVEPOINT inside a transaction we already track
        if self._target.engine_scoped and not self._on_engine(connection):
            return
        state = self._state(session)
        tracked = state.transaction() if state.transaction is not None else None
        if tracked is transaction:
            return  # a second bind joining the same transaction
        state.transaction = weakref.ref(transaction)
        state.began_at = time.perf_counter()
        state.inside.clear()
        state.cross_thread_reported = False
        state.stale_reads = 0
        state.reported_writes.clear()
        state.system = self._system_name(connection.dialect)
        state.namespace = connection.engine.url.database
        size = len(session.identity_map)
        state.identity_map = session.identity_map
        state.max_identity_map_size = size
        self._counters.begun(size)
        state.span = self._telemetry.transaction_begun(session.hash_key, size)
        if state.finalizer is None:
            # A session dropped in the middle of a transaction fires no event:
            # end its span (and count it) when it is collected. One finalizer
            # per session, not per transaction: it looks at the state then.
            state.finalizer = weakref.finalize(
                session, self._abandoned, state, session.hash_key
            )
        self._connections[connection] = weakref.ref(session)
        self._watch_engine(connection.engine)
        self._check_request(session, state)
        if "begin" in self._config.expire:
            self._expire(session, "begin")

    def _tracked(self, session: Session) -> SessionState | None:
        """The session's state if its current root transaction is tracked."""
        state = self._sessions.get(session)
        if state is None or state.transaction is None:
            return None
        if session.in_nested_transaction():
            return None  # a SAVEPOINT ending, not the transaction
        if state.transaction() is not session.get_transaction():
            return None
        return state

    @fail_open
    def _after_commit(self, session: Session) -> None:
        state = self._tracked(session)
        if state is None:
            return
        if "commit" in self._config.expire and not session.expire_on_commit:
            self._expire(session, "commit")
        self._finish(session, state, "commit")

    @fail_open
    def _after_rollback(self, session: Session) -> None:
        state = self._tracked(session)
        if state is not None:
            self._finish(session, state, "rollback")

    @fail_open
    def _after_transaction_end(
        self, session: Session, transaction: SessionTransaction
    ) -> None:
        # A session closed in the middle of a transaction ends it without
        # after_commit or after_rollback: the connection is rolled back.
        if transaction.parent is not None:
            return
        state = self._sessions.get(session)
        tracked = state.transaction if state is not None else None
        if state is not None and tracked is not None and tracked() is transaction:
            self._finish(session, state, "rollback")

    def _finish(self, session: Session, state: SessionState, outcome: str) -> None:
        state.transaction = None
        state.inside.clear()
        statements = state.statements - state.statements_at_begin
        state.statements_at_begin = state.statements
        size = max(len(session.identity_map), state.max_identity_map_size)
        held, state.identity_map = state.identity_map, None
        if held is not None and held is not session.identity_map:
            size = max(size, len(held))
        self._counters.ended(outcome, size)
        span, state.span = state.span, None
        self._telemetry.transaction_ended(
            span,
            session_id=session.hash_key,
            outcome=outcome,
            identity_map_size=size,
            statements=statements,
            duration_s=time.perf_counter() - state.began_at,
            system=state.system,
            namespace=state.namespace,
            stale_reads=state.stale_reads,
        )

    def _abandoned(self, state: SessionState, session_id: int) -> None:
        """A session was garbage-collected; end its transaction if one was open."""
        if not self._installed or state.transaction is None:
            return
        state.transaction = None
        span, state.span = state.span, None
        self._counters.ended("rollback", 0)
        self._telemetry.transaction_ended(
            span,
            session_id=session_id,
            outcome="rollback",
            identity_map_size=0,
            statements=0,
            duration_s=time.perf_counter() - state.began_at,
            system=state.system,
            namespace=state.namespace,
            stale_reads=0,
        )
