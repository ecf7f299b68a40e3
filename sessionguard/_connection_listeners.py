"""
Core listeners on the engines guarded sessions use: writes that bypass the
session (``unsynchronized_write``) and two threads inside one session's
connection at once (``cross_thread``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import TextClause

from . import _writes
from ._context import current_request
from ._core import GuardCore, SessionState, fail_open, installed_lock
from ._findings import (
    CrossThread,
    UnsynchronizedWrite,
)
from ._location import user_location as _user_location

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.orm import Mapper, ORMExecuteState, Session

__all__ = ["ConnectionListeners"]


def _run_by_session(execution_options: Mapping[str, Any]) -> bool:
    """
    Whether an ORM-enabled DML statement reached the connection via the Session.

    Session.execute() passes its ``_sa_orm_*_options``; the ORM's own
    persistence code (bulk UPDATE by primary key) passes the mapper's
    ``compiled_cache``. An ORM statement run on ``session.connection()``
    directly carries neither, and bypasses the identity map.
    """
    return execution_options.get("compiled_cache") is not None or any(
        key.startswith("_sa_orm_") for key in execution_options
    )


class ConnectionListeners(GuardCore):
    """Listeners on an engine's connections, registered per engine."""

    def _watch_engine(self, engine: Engine) -> None:
        """
        Listen on *engine* for writes that bypass the session and for two
        threads inside one session's connection at once.

        Per engine, as sessions first use it, rather than on the Engine class:
        a class-level listener makes every connection of every engine in the
        process take SQLAlchemy's event path. A Connection checks its engine's
        listeners at each execution, so one already open sees them too.
        """
        if engine in self._watched_engines or not isinstance(engine, Engine):
            return  # (a test double standing in for an engine has no events)
        with installed_lock:
            if engine in self._watched_engines or not self._installed:
                return
            self._watched_engines.add(engine)
            if self._detect:
                self._listen(engine, "before_execute", self._before_core_execute)
            self._listen(engine, "before_cursor_execute", self._before_cursor_execute)
            self._listen(engine, "after_cursor_execute", self._leave_connection)
            self._listen(engine, "handle_error", self._statement_failed)

    def _inside_state(self, connection: Connection | None) -> SessionState | None:
        session_ref = self._connections.get(connection) if connection else None
        session = session_ref() if session_ref is not None else None
        if session is None:
            return None
        state = self._sessions.get(session)
        if state is None or state.transaction is None:
            return None
        return state

    def _enter_connection(self, connection: Connection, state: SessionState) -> None:
        # Only a statement overlapping another thread's is a finding: a
        # session handed from thread to thread (TestClient's portal, a
        # worker pool) is used by one thread at a time, which is fine.
        me = threading.get_ident()
        inside = state.inside
        depth, thread = inside.get(me, (0, None))
        inside[me] = (depth + 1, thread or threading.current_thread())
        if len(inside) > 1 and not state.cross_thread_reported:
            state.cross_thread_reported = True
            session_ref = self._connections.get(connection)
            session = session_ref() if session_ref is not None else None
            others = [t for ident, (_, t) in list(inside.items()) if ident != me]
            if session is not None and others:
                self._cross_thread(session, others[0])

    @fail_open
    def _leave_connection(self, connection: Connection, *args: Any) -> None:
        state = self._inside_state(connection)
        if state is not None:
            self._leave(state)

    @fail_open
    def _statement_failed(self, context: Any) -> None:
        state = self._inside_state(getattr(context, "connection", None))
        if state is not None:
            self._leave(state)

    @staticmethod
    def _leave(state: SessionState) -> None:
        me = threading.get_ident()
        entry = state.inside.get(me)
        if entry is None:
            return
        depth, thread = entry
        if depth > 1:
            state.inside[me] = (depth - 1, thread)
        else:
            state.inside.pop(me, None)

    def _cross_thread(self, session: Session, first: threading.Thread) -> None:
        other = threading.current_thread()
        request = current_request()
        self._record(
            CrossThread(
                session_id=session.hash_key,
                location=_user_location(),
                request_id=request.request_id if request is not None else None,
                first_thread=f"{first.name} ({first.ident})",
                other_thread=f"{other.name} ({other.ident})",
            )
        )

    def _check_orm_dml(self, orm_state: ORMExecuteState) -> None:
        statement = _writes.dml_of(orm_state.statement)
        if statement is None:
            return
        name = getattr(getattr(statement, "table", None), "name", None)
        if name is None:
            return
        if orm_state.is_from_statement:
            # select(...).from_statement(update(...).returning(...)): the ORM
            # hands back the rows but synchronises nothing, whatever the
            # options say (objects already in the map keep their values).
            kind = "from_statement"
        else:
            # Read the option as SQLAlchemy does, from the execution options
            # (update_delete_options refuses lambda statements).
            sync = orm_state.execution_options.get("synchronize_session", "auto")
            if sync is not False:
                return
            kind = "orm_update" if statement.is_update else "orm_delete"
        self._unsynchronized(orm_state.session, (name,), kind)

    @fail_open
    def _before_core_execute(
        self,
        connection: Connection,
        clauseelement: Any,
        multiparams: Any,
        params: Any,
        execution_options: Mapping[str, Any],
    ) -> None:
        if isinstance(clauseelement, TextClause):
            names = _writes.text_dml_tables(clauseelement.text)
            kind = "text"
        else:
            statement = _writes.dml_of(clauseelement)
            if statement is None or statement is not getattr(
                clauseelement, "_resolved", clauseelement
            ):
                # Not a write, or one wrapped in an ORM from_statement():
                # do_orm_execute's business.
                return
            if statement._propagate_attrs.get(
                "compile_state_plugin"
            ) == "orm" and _run_by_session(execution_options):
                return  # executed through the session: do_orm_execute's business
            name = getattr(getattr(statement, "table", None), "name", None)
            names = (name,) if name is not None else ()
            kind = "core"
        if names:
            self._core_write(connection, names, kind)

    @fail_open
    def _before_cursor_execute(  # noqa: PLR0917 - SQLAlchemy's event signature
        self,
        connection: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        state = self._inside_state(connection)
        if state is None:
            return  # not a tracked session transaction's connection
        self._enter_connection(connection, state)
        # Writes: only what before_execute never saw, exec_driver_sql() strings.
        if not self._detect or context is None or context.compiled is not None:
            return
        names = _writes.text_dml_tables(statement)
        if names:
            self._core_write(connection, names, "driver_sql")

    def _core_write(
        self, connection: Connection, names: tuple[str, ...], kind: str
    ) -> None:
        session = self._session_for_connection(connection)
        if session is None or session._flushing:
            return
        self._unsynchronized(session, names, kind)

    def _session_for_connection(self, connection: Connection) -> Session | None:
        session_ref = self._connections.get(connection)
        session = session_ref() if session_ref is not None else None
        if session is None:
            return None
        state = self._sessions.get(session)
        if state is None or state.transaction is None:
            return None  # the connection went back to the pool since
        return session

    def _unsynchronized(
        self, session: Session, tables: tuple[str, ...], statement: str
    ) -> None:
        for table in tables:
            self._unsynchronized_table(session, table, statement)

    def _unsynchronized_table(
        self, session: Session, table: str, statement: str
    ) -> None:
        # Finding the table's objects walks the identity map: do it (and
        # report) once per table and kind of write in a transaction, not for
        # every statement of a loop.
        tracked = self._sessions.get(session)
        if tracked is not None and tracked.transaction is not None:
            if (table, statement) in tracked.reported_writes:
                return
            tracked.reported_writes.add((table, statement))
        entities: dict[str, int] = {}
        for state in session.identity_map.all_states():
            mapper: Mapper[Any] = state.mapper
            if any(getattr(t, "name", None) == table for t in mapper.tables):
                name = mapper.class_.__name__
                entities[name] = entities.get(name, 0) + 1
        if not entities:
            return
        request = current_request()
        self._record(
            UnsynchronizedWrite(
                session_id=session.hash_key,
                location=_user_location(),
                request_id=request.request_id if request is not None else None,
                table=table,
                statement=statement,
                entities=tuple(sorted(entities)),
                objects=sum(entities.values()),
            )
        )
