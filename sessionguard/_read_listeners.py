"""
Reads: the ``do_orm_execute`` listener (the hot path) and the answers to the
process-wide read hooks of ``_stale`` (ORM statements' objects, identity
lookups).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause

from . import _stale, _writes
from ._context import _current as _current_request
from ._transaction_listeners import TransactionListeners
from .exceptions import StaleReadError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Mapper, ORMExecuteState

    from ._core import SessionState

__all__ = ["ReadListeners"]


_BINDS = _stale.BINDS


class ReadListeners(TransactionListeners, _stale.ReadObserver):
    """What a guard does for every ORM statement and identity-map read."""

    def _do_orm_execute(self, orm_state: ORMExecuteState) -> None:
        # The hot path: every ORM statement. It only counts and looks; the
        # objects a statement returns are checked by the read hook in _stale
        # as SQLAlchemy makes them. Returning a result from here would change
        # how SQLAlchemy runs the statement, so nothing is ever returned.
        # Fail-open inline (no fail_open wrapper: one call less per statement).
        try:
            session = orm_state.session
            state = self._sessions.get(session.hash_key)
            if state is None or (
                self._engine_scoped
                and (
                    session.bind is not state.bind
                    or orm_state.bind_arguments.get("bind") is not None
                    or getattr(session, _BINDS, True)
                )
            ):
                state = self._statement_state(orm_state)
                if state is None:
                    return  # another engine's statement
            state.statements += 1
            counters = self._counters
            with counters.lock:
                counters.values["statements"] += 1
            size = len(session.identity_map._dict)
            if size > state.max_identity_map_size:  # noqa: PLR1730 - no call
                state.max_identity_map_size = size
            if _current_request.get() is not None:
                self._check_request(session, state)
            statement = orm_state.statement
            if not self._detect:
                return
            if statement.is_dml:
                # Writes are few and not sampled: a skipped one would go unseen.
                self._check_session_write(orm_state)
            elif isinstance(statement, TextClause):
                names = _writes.text_dml_tables(statement.text)
                if names:
                    self._unsynchronized(session, names, "text")
        except (StaleReadError, Warning):
            raise  # asked for (warnings as errors)
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error("_do_orm_execute", error)

    def _statement_state(self, orm_state: ORMExecuteState) -> SessionState | None:
        """The session's state if the statement is the guard's (engine filter)."""
        session = orm_state.session
        if not self._engine_scoped:
            return self._state(session)
        bind = self._statement_bind(orm_state)
        if not self._on_engine(bind):
            return None
        state = self._state(session)
        # Next time, one comparison: the same session.bind, and nothing
        # (bind=, per-mapper binds, an overridden get_bind()) choosing another.
        given = orm_state.bind_arguments.get("bind")
        if (
            given is None
            and bind is session.bind
            and type(session).get_bind is Session.get_bind
        ):
            state.bind = bind
        return state

    def _check_session_write(self, orm_state: ORMExecuteState) -> None:
        statement = _writes.dml_of(orm_state.statement)
        if statement is None:
            return
        if statement._propagate_attrs.get("compile_state_plugin") == "orm":
            if orm_state.is_update or orm_state.is_delete:
                self._check_orm_dml(orm_state)
            return
        # Core DML (on a Table) through session.execute(): SQLAlchemy
        # synchronises nothing in the identity map.
        name = getattr(getattr(statement, "table", None), "name", None)
        if name is not None:
            self._unsynchronized(orm_state.session, (name,), "core")

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
            and not getattr(session, _BINDS, True)  # per-mapper/table binds
        ):
            return session.bind
        return session.get_bind(**arguments)

    def covers_lookup(self, session: Session, mapper: Mapper[Any]) -> bool:
        # Sampling first; an unsampled lookup outside a request context (where
        # nothing else is looked at) costs one random number at most.
        try:
            rate = self._sample_rate
            sampled = self._detect and (
                rate >= 1.0 or (rate > 0.0 and self._random.random() < rate)
            )
            request = _current_request.get()
            if not sampled and request is None:
                return False
            if not self._installed or not self._target.covers(session):
                return False
            if self._engine_scoped and not self._on_engine(
                session.get_bind(mapper=mapper)
            ):
                return False
            if request is not None:
                self._check_request(session, self._state(session))
            return sampled
        except (StaleReadError, Warning):
            raise  # asked for (warnings as errors)
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error("covers_lookup", error)
            return False

    def identity_hit(self, session: Session, hit: _stale.Hit) -> None:
        try:
            self._check(session, [hit], raise_stale=True)
        except (StaleReadError, Warning):
            raise  # asked for: on_stale="raise", or warnings turned into errors
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error("identity_hit", error)

    def covers_statement(self, session: Session, connection: Connection) -> bool:
        # Sampling first: an unsampled statement costs one random number.
        try:
            if not self._detect or (
                self._sample_rate < 1.0 and self._random.random() >= self._sample_rate
            ):
                return False
            if not self._installed or (
                # A session with state is one of the guard's (its listeners made it).
                session.hash_key not in self._sessions
                and not self._target.covers(session)
            ):
                return False
            return not self._engine_scoped or connection.engine is self._engine_ref()
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error("covers_statement", error)
            return False

    def statement_hits(self, session: Session, hits: list[_stale.Hit]) -> None:
        try:
            self._check(session, hits, raise_stale=True)
        except (StaleReadError, Warning):
            raise  # asked for: on_stale="raise", or warnings turned into errors
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error("statement_hits", error)
