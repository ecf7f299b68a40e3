"""Session transaction listeners: begin, commit, rollback, and their telemetry."""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.metrics import _internal as metrics_internal

from ._connection_listeners import ConnectionListeners
from ._context import _current as _current_request
from ._telemetry import PROVIDER_FLAGS
from .exceptions import StaleReadError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session, SessionTransaction

    from ._core import SessionState

__all__ = ["TransactionListeners"]


class TransactionListeners(ConnectionListeners):
    """The session's ``after_begin``, ``after_commit``, ``after_rollback`` and
    ``after_transaction_end``.

    These run for every transaction: each does its few steps inline (its own
    ``try``, not :func:`fail_open`'s extra call), reads SQLAlchemy's private
    attributes rather than calling the public methods that wrap them, and
    leaves telemetry to :class:`Telemetry` only when something can record it.
    """

    def _after_begin(
        self, session: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        try:
            if transaction._parent is not None:
                return  # a SAVEPOINT inside a transaction we already track
            if self._engine_scoped and connection.engine is not self._engine_ref():
                return
            state = self._sessions.get(session.hash_key) or self._state(session)
            tracked = state.transaction
            if tracked is not None and tracked() is transaction:
                return  # a second bind joining the same transaction
            if connection.dialect is not state.dialect:
                self._session_changed_dialect(state, connection)
            state.transaction = weakref.ref(transaction)
            state.transactions += 1
            if state.noted:  # what the last transaction noted, forgotten
                state.noted = state.cross_thread_reported = False
                state.stale_reads = 0
                if state.reported_writes:
                    state.reported_writes.clear()
            identity_map = state.identity_map = session.identity_map
            size = state.max_identity_map_size = len(identity_map._dict)
            telemetry = self._telemetry
            if telemetry.active or (
                telemetry.may_go_live
                # provider_maybe_set(), inline: attribute reads, no call,
                # until set_tracer_provider()/set_meter_provider() is called.
                and (
                    not PROVIDER_FLAGS
                    or trace._TRACER_PROVIDER is not None
                    or metrics_internal._METER_PROVIDER_SET_ONCE._done
                )
                and telemetry.went_live()
            ):
                # Only what can be recorded is measured: with OpenTelemetry's
                # no-op providers and debug logging off, a transaction costs
                # the counts above and nothing else. The start is for the
                # duration, and for the span of an unsampled transaction in
                # which something is found (_span_of).
                state.began_at = time.perf_counter()
                # A transaction is traced (its span and its two histograms)
                # when sampled; the transaction counter counts every one,
                # from the sessions' own counts. random() is in [0, 1): at
                # 1.0 every transaction is sampled, at 0.0 none.
                sampled = state.sampled = self._random.random() < self._sample_rate
                if sampled or telemetry.debug_on:
                    state.span = telemetry.transaction_begun(
                        session.hash_key, size, sampled
                    )
            if connection is session.bind:
                # A session bound to a Connection (the test-suite pattern that
                # joins an outer transaction): user code holds that connection.
                self._watch_connection(connection, session)
            if _current_request.get() is not None:
                self._check_request(session, state)
            if self._expire_on_begin:
                self._expire(session, "begin")
        except (StaleReadError, Warning):
            raise  # asked for (warnings as errors)
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error("_after_begin", error)

    def _tracked(self, session: Session) -> SessionState | None:
        """The session's state if its current root transaction is tracked."""
        state = self._sessions.get(session.hash_key)
        if state is None or state.transaction is None:
            return None
        if session._nested_transaction is not None:
            return None  # a SAVEPOINT ending, not the transaction
        root = session._transaction
        while root is not None and root._parent is not None:
            root = root._parent
        if state.transaction() is not root:
            return None
        return state

    def _after_commit(self, session: Session) -> None:
        try:
            state = self._sessions.get(session.hash_key)
            if state is None:
                return
            tracked = state.transaction
            # The tracked transaction is a root one: it is the session's
            # current transaction only when no SAVEPOINT (nor subtransaction)
            # is open, which is the plain commit of the whole transaction.
            if tracked is None or tracked() is not session._transaction:
                state = self._tracked(session)  # the general case
                if state is None:
                    return
            if self._expire_on_commit and not session.expire_on_commit:
                self._expire(session, "commit")
            state.commits += 1
            self._finish(session, state, "commit")
        except (StaleReadError, Warning):
            raise
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error("_after_commit", error)

    def _after_rollback(self, session: Session) -> None:
        try:
            state = self._tracked(session)
            if state is not None:
                state.rollbacks += 1
                self._finish(session, state, "rollback")
        except (StaleReadError, Warning):
            raise
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error("_after_rollback", error)

    def _after_transaction_end(
        self, session: Session, transaction: SessionTransaction
    ) -> None:
        # A session closed in the middle of a transaction ends it without
        # after_commit or after_rollback: the connection is rolled back.
        try:
            state = self._sessions.get(session.hash_key)
            if state is None:
                return
            tracked = state.transaction
            if tracked is not None and tracked() is transaction:
                state.rollbacks += 1
                self._finish(session, state, "rollback")
        except (StaleReadError, Warning):
            raise
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error("_after_transaction_end", error)

    def _finish(self, session: Session, state: SessionState, outcome: str) -> None:
        """The end of a tracked transaction, counted by the caller."""
        state.transaction = None
        identity_map = session.identity_map
        size = len(identity_map._dict)
        if state.max_identity_map_size > size:  # noqa: PLR1730 - no call
            size = state.max_identity_map_size
        held = state.identity_map
        if held is not identity_map:
            # close() swapped in an empty map before ending the transaction
            # (or expunge_all() ran in it): the map held from begin is the
            # one that was filled. Let it go now; the session's own map is
            # held until the next begin or until the session is collected.
            state.identity_map = None
            if held is not None:
                size = max(size, len(held._dict))
        if size > self._counters.max_identity_map_size:
            self._counters.raise_max(size)
        began_at, state.began_at = state.began_at, 0.0
        span = state.span
        telemetry = self._telemetry
        if not began_at or (span is None and not telemetry.debug_on):
            # Nothing could record it when it began; or it was not sampled (a
            # sampled transaction has its span), has no late span and nothing
            # is logged: counted by the session, nothing else to do.
            state.statements_at_begin = state.statements
            return
        state.span = None
        statements = state.statements - state.statements_at_begin
        state.statements_at_begin = state.statements
        telemetry.transaction_ended(
            span,
            state.sampled,
            session.hash_key,
            outcome,
            size,
            statements,
            time.perf_counter() - began_at,
            state.system,
            state.namespace,
            state.stale_reads,
        )

    def _abandoned(self, state: SessionState, session_id: int) -> None:
        """A session was garbage-collected; end its transaction if one was open."""
        if not self._installed or state.transaction is None:
            return
        state.transaction = None
        state.rollbacks += 1
        span, state.span = state.span, None
        began_at, state.began_at = state.began_at, 0.0
        if not began_at:
            return
        self._telemetry.transaction_ended(
            span,
            state.sampled,
            session_id,
            "rollback",
            0,
            0,
            time.perf_counter() - began_at,
            state.system,
            state.namespace,
            0,
        )
