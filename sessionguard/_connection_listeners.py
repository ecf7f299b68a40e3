"""
Writes that bypass the session (``unsynchronized_write``) and two threads
inside one session at once (``cross_thread``).

Core listeners go only on connections handed to user code
(``session.connection()``, a session bound to a Connection), never on an
engine; the threads inside a session are bracketed by ``_session_hooks``.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import TextClause

from . import _session_hooks, _writes
from ._context import current_request
from ._core import GuardCore, fail_open, installed_lock
from ._findings import (
    CrossThread,
    UnsynchronizedWrite,
)
from ._location import user_location as _user_location

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.orm import Mapper, Session

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


def _execution_option(
    session: Session, statement: Any, kwargs: Any, name: str, default: Any
) -> Any:
    """An execution option as SQLAlchemy resolves it for a session statement."""
    for options in (
        kwargs.get("execution_options"),
        getattr(statement, "_execution_options", None),
        # Session-wide options are new in SQLAlchemy 2.1.
        getattr(session, "execution_options", None),
    ):
        if options and name in options:
            return options[name]
    return default


class ConnectionListeners(GuardCore):
    """Listeners on the connections user code gets from a guarded session."""

    def _watch_connection(self, connection: object, session: Session) -> None:
        """
        Listen on *connection*, which user code holds, for writes that bypass
        the session and for a thread executing on it while another is inside
        the session.

        Per connection, and only for one handed out (``session.connection()``,
        a session bound to a Connection): a listener on the engine, or on the
        Engine class, would put every connection of the engine on
        SQLAlchemy's event path, the costliest part of listening at all.
        """
        if not isinstance(connection, Connection):
            return  # a test double standing in for a connection has no events
        self._connections[connection] = weakref.ref(session)
        if connection in self._watched_connections:
            return
        with installed_lock:
            if connection in self._watched_connections or not self._installed:
                return
            self._watched_connections.add(connection)
            # Not in self._listeners: connections come and go by the thousand.
            # uninstall() walks the live ones in _watched_connections.
            for identifier, function in self._connection_listeners():
                event.listen(connection, identifier, function)
            dialect = connection.dialect
            if dialect not in self._watched_dialects:
                # handle_error is the dialect's (SQLAlchemy refuses it per
                # connection); it only costs when a statement fails.
                self._watched_dialects.add(dialect)
                self._listen(dialect, "handle_error", self._statement_failed)

    def _connection_listeners(self) -> list[tuple[str, Callable[..., Any]]]:
        listeners: list[tuple[str, Callable[..., Any]]] = [
            ("before_cursor_execute", self._before_cursor_execute),
            ("after_cursor_execute", self._leave_connection),
        ]
        if self._detect:
            listeners.append(("before_execute", self._before_core_execute))
        return listeners

    @fail_open
    def connection_handed_out(self, session: Session, connection: Connection) -> None:
        state = self._sessions.get(session.hash_key)
        if state is None or state.transaction is None:
            return  # not a session this guard tracks a transaction of
        if self._engine_scoped and not self._on_engine(connection):
            return
        self._watch_connection(connection, session)

    @fail_open
    def threads_overlap(self, session: Session, first_thread: str) -> None:
        state = self._sessions.get(session.hash_key)
        if state is None or state.transaction is None or state.cross_thread_reported:
            return
        state.cross_thread_reported = state.noted = True
        self._cross_thread(session, first_thread)

    @fail_open
    def _leave_connection(self, connection: Connection | None, *args: Any) -> None:
        session = self._session_for_connection(connection)
        if session is not None:
            _session_hooks.leave(session)

    @fail_open
    def _statement_failed(self, context: Any) -> None:
        self._leave_connection(getattr(context, "connection", None))

    def _cross_thread(self, session: Session, first: str) -> None:
        other = threading.current_thread()
        request = current_request()
        self._record(
            CrossThread(
                session_id=session.hash_key,
                location=_user_location(),
                request_id=request.request_id if request is not None else None,
                first_thread=first,
                other_thread=f"{other.name} ({other.ident})",
            )
        )

    def _check_orm_dml(
        self, session: Session, statement: Any, dml: Any, kwargs: Any
    ) -> None:
        """An ORM UPDATE or DELETE run by *session*: does it synchronise?"""
        name = getattr(getattr(dml, "table", None), "name", None)
        if name is None:
            return
        resolved = getattr(statement, "_resolved", statement)
        if getattr(resolved, "is_from_statement", False):
            # select(...).from_statement(update(...).returning(...)): the ORM
            # hands back the rows but synchronises nothing, whatever the
            # options say (objects already in the map keep their values).
            kind = "from_statement"
        else:
            # Read the option as SQLAlchemy does: the options passed to
            # execute(), over the statement's, over the session's
            # (update_delete_options refuses lambda statements).
            sync = _execution_option(
                session, resolved, kwargs, "synchronize_session", "auto"
            )
            if sync is not False:
                return
            kind = "orm_update" if dml.is_update else "orm_delete"
        self._unsynchronized(session, (name,), kind)

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
                # the statement hook's business.
                return
            if statement._propagate_attrs.get(
                "compile_state_plugin"
            ) == "orm" and _run_by_session(execution_options):
                return  # executed through the session: the statement hook's business
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
        session = self._session_for_connection(connection)
        if session is None:
            return  # not a tracked session transaction's connection
        _session_hooks.enter(session)
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

    def _session_for_connection(self, connection: Connection | None) -> Session | None:
        if connection is None:
            return None
        session_ref = self._connections.get(connection)
        session = session_ref() if session_ref is not None else None
        if session is None:
            return None
        state = self._sessions.get(session.hash_key)
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
        tracked = self._sessions.get(session.hash_key)
        if tracked is not None and tracked.transaction is not None:
            reported = tracked.reported_writes
            if reported is None:
                reported = tracked.reported_writes = set()
            elif (table, statement) in reported:
                return
            reported.add((table, statement))
            tracked.noted = True
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
