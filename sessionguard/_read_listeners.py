"""
Reads: every statement a session runs (the hot path, told by the
``_execute_internal`` hook of ``_session_hooks``) and the answers to the
process-wide read hooks of ``_stale`` (ORM statements' objects, identity
lookups).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import Select

from . import _stale, _writes
from ._context import _current as _current_request
from ._transaction_listeners import TransactionListeners
from .exceptions import StaleReadError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Mapper

    from ._core import SessionState

__all__ = ["ReadListeners"]


_BINDS = _stale.BINDS


class ReadListeners(TransactionListeners, _stale.ReadObserver):
    """What a guard does for every ORM statement and identity-map read."""

    def statement_executing(
        self, session: Session, state: SessionState, statement: Any, kwargs: Any
    ) -> None:
        # The hot path: every statement of a watched session, told by the
        # _execute_internal hook before SQLAlchemy runs it. It only counts and
        # looks; the objects a statement returns are checked by the read hook
        # in _stale as SQLAlchemy makes them. Fail-open inline (no fail_open
        # wrapper: one call less per statement).
        try:
            if self._engine_scoped and (
                session.bind is not state.bind
                or getattr(session, _BINDS, True)
                or (
                    (given := kwargs.get("bind_arguments")) is not None
                    and given.get("bind") is not None
                )
            ):
                bind, plain = self._statement_bind(session, statement, kwargs)
                if not self._on_engine(bind):
                    return  # another engine's statement
                if plain:
                    state.bind = bind  # next time, the one comparison above
            state.statements += 1
            size = len(session.identity_map._dict)
            if size > state.max_identity_map_size:  # noqa: PLR1730 - no call
                state.max_identity_map_size = size
            if _current_request.get() is not None:
                self._check_request(session, state)
            if statement.__class__ is not Select and self._detect:
                self._check_statement_write(session, statement, kwargs)
        except (StaleReadError, Warning):
            raise  # asked for (warnings as errors)
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error("statement_executing", error)

    def unwatched_statement(
        self, session: Session, statement: Any, kwargs: Any
    ) -> None:
        # A session this guard does not watch yet: its first statement (the
        # transaction it begins is begun while SQLAlchemy runs it), or one
        # whose transaction began before the guard was installed.
        try:
            if not self._installed or not self._target.covers(session):
                return
            if self._engine_scoped:
                bind, plain = self._statement_bind(session, statement, kwargs)
                if not self._on_engine(bind):
                    return
                state = self._state(session)
                if plain:
                    state.bind = bind  # its next statements: one comparison
            else:
                state = self._state(session)
        except (StaleReadError, Warning):
            raise
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error("unwatched_statement", error)
            return
        self.statement_executing(session, state, statement, kwargs)

    def _check_statement_write(
        self, session: Session, statement: Any, kwargs: Any
    ) -> None:
        if isinstance(statement, TextClause):
            names = _writes.text_dml_tables(statement.text)
            if names:
                self._unsynchronized(session, names, "text")
            return
        dml = _writes.dml_of(statement)
        if dml is None:
            return
        if dml._propagate_attrs.get("compile_state_plugin") == "orm":
            if dml.is_update or dml.is_delete:
                self._check_orm_dml(session, statement, dml, kwargs)
            return
        # Core DML (on a Table) through session.execute(): SQLAlchemy
        # synchronises nothing in the identity map.
        name = getattr(getattr(dml, "table", None), "name", None)
        if name is not None:
            self._unsynchronized(session, (name,), "core")

    @staticmethod
    def _statement_bind(
        session: Session, statement: Any, kwargs: Any
    ) -> tuple[Engine | Connection, bool]:
        """
        (where the statement will run, asking get_bind() only when needed;
        whether that is session.bind and nothing can choose another: no
        bind=, no per-mapper binds, get_bind() not overridden).
        """
        given = kwargs.get("bind_arguments")
        bind = given.get("bind") if given else None
        if bind is not None:
            return bind, False
        # A session with one bind answers without calling get_bind(), which
        # a subclass may override (sharding chooses a shard there).
        if (
            session.bind is not None
            and type(session).get_bind is Session.get_bind
            and not getattr(session, _BINDS, True)  # per-mapper/table binds
        ):
            return session.bind, True
        # The arguments SQLAlchemy's _execute_internal() gives get_bind().
        arguments = dict(given) if given else {}
        resolved = getattr(statement, "_resolved", statement)
        attributes = getattr(resolved, "_propagate_attrs", None) or {}
        if attributes.get("compile_state_plugin") == "orm":
            arguments["clause"] = resolved
            subject = attributes.get("plugin_subject")
            if subject:
                arguments["mapper"] = subject.mapper
        else:
            arguments.setdefault("clause", resolved)
        return session.get_bind(**arguments), False

    def covers_lookup(self, session: Session, mapper: Mapper[Any]) -> bool:
        # Sampling first; an unsampled lookup outside a request context (where
        # nothing else is looked at) costs one random number at most.
        try:
            # random() is in [0, 1): at 1.0 every lookup, at 0.0 none.
            sampled = self._detect and self._random.random() < self._sample_rate
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

    def statement_rate(self) -> float:
        return self._sample_rate if self._detect and self._statements_hooked else 0.0

    def samples_statement(self, given: float) -> bool:
        # Asked once the hook's coin let the statement through with
        # probability *given*: this guard takes rate / given of those.
        rate = self._sample_rate
        if not self._detect or rate <= 0.0:
            return False
        return rate >= given or self._random.random() * given < rate

    def covers_statement(self, session: Session, connection: Connection) -> bool:
        try:
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
