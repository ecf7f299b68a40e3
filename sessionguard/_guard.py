"""install_guard, the Guard handle, and the bookkeeping of its listeners."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import random
import sys
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.sql.elements import TextClause

from . import _stale, _writes
from ._config import GuardConfig, Mode, parse_mode
from ._context import current_request
from ._findings import (
    CrossThread,
    Finding,
    SharedSession,
    StaleRead,
    UnsynchronizedWrite,
)
from ._location import user_location as _user_location
from ._targets import Target, resolve_target
from ._telemetry import Telemetry, db_system_name
from .exceptions import SessionGuardError, SessionGuardWarning, StaleReadError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType

    from opentelemetry.trace import Span
    from sqlalchemy.orm import Mapper, ORMExecuteState, SessionTransaction
    from sqlalchemy.orm.identity import IdentityMap
    from sqlalchemy.orm.state import InstanceState

__all__ = ["Guard", "GuardStats", "install_from_env", "install_guard"]


@dataclasses.dataclass(frozen=True)
class GuardStats:
    """A snapshot of a guard's counters, from :meth:`Guard.stats`."""

    transactions: int = 0
    commits: int = 0
    rollbacks: int = 0
    statements: int = 0
    identity_map_hits: int = 0
    verified_objects: int = 0
    stale_reads: int = 0
    expire_all_calls: int = 0
    verification_errors: int = 0
    max_identity_map_size: int = 0
    skipped_checks: int = 0
    """Identity-map hits not checked: outside the asyncio greenlet, sharded, or
    with a NULL part in their primary key."""
    internal_errors: int = 0
    """Failures inside the guard itself, logged as ``internal_error``."""


_COUNTERS = tuple(field.name for field in dataclasses.fields(GuardStats))


class _Counters:
    """Mutable counters behind :class:`GuardStats`, exact across threads."""

    def __init__(self) -> None:
        # Re-entrant: a finalizer run by the garbage collector inside a locked
        # block of the same thread (a session collected mid-transaction) counts.
        self.lock = threading.RLock()
        self.values = dict.fromkeys(_COUNTERS, 0)

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            self.values[name] += amount

    def high_water(self, name: str, value: int) -> None:
        with self.lock:
            self.values[name] = max(self.values[name], value)

    def snapshot(self) -> GuardStats:
        with self.lock:
            return GuardStats(**self.values)

    def reset(self) -> None:
        with self.lock:
            self.values = dict.fromkeys(_COUNTERS, 0)


class _SessionState:
    """What one guard knows of one session; lives as long as the session."""

    __slots__ = (
        "began_at",
        "cross_thread_reported",
        "finalizer",
        "identity_map",
        "inside",
        "max_identity_map_size",
        "namespace",
        "reported_writes",
        "request",
        "span",
        "stale_reads",
        "statements",
        "statements_at_begin",
        "system",
        "transaction",
    )

    def __init__(self) -> None:
        self.transaction: weakref.ref[SessionTransaction] | None = None
        self.began_at = 0.0
        self.statements = 0
        self.statements_at_begin = 0
        # Threads executing on the session's connection right now, with
        # how deep (a statement can run inside another one's event).
        self.inside: dict[int, tuple[int, threading.Thread]] = {}
        self.cross_thread_reported = False
        # The map at begin (close() swaps in an empty one before the
        # transaction ends) and the most objects seen at a statement: the
        # size reported is the most the session held, in O(1).
        self.identity_map: IdentityMap | None = None
        self.max_identity_map_size = 0
        self.request: object = None
        self.span: Span | None = None
        self.system = "other_sql"
        self.namespace: str | None = None
        self.stale_reads = 0
        self.finalizer: weakref.finalize[Any, Any] | None = None
        self.reported_writes: set[tuple[str, str]] = set()


# One guard per target: listening the same function twice on a class target
# doubles it, and one remove() then leaves an orphan.
_installed: weakref.WeakKeyDictionary[Any, Guard] = weakref.WeakKeyDictionary()
# Re-entrant: the finalizer of a collected Session or engine target
# uninstalls its guard, and the collector can run it inside install_guard().
_installed_lock = threading.RLock()
# Every installed guard, also those whose target was collected before they
# were uninstalled (the test suite's clean-up walks it).
_live: set[Guard] = set()


_Method = TypeVar("_Method", bound="Callable[..., Any]")


def _fail_open(method: _Method) -> _Method:
    """Run a listener so that a failure of the guard never reaches the user."""

    @functools.wraps(method)
    def listener(self: Guard, *args: Any) -> Any:
        try:
            return method(self, *args)
        except (StaleReadError, Warning):
            raise  # asked for: on_stale="raise", or warnings turned into errors
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error(method.__name__, error)
            return None

    return listener  # type: ignore[return-value]


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


def _warn_at(message: str, location: str | None) -> None:
    """A SessionGuardWarning attributed to the user's line, for warning filters."""
    path, _, line = (location or "").rpartition(":")
    if not path or not line.isdigit():
        warnings.warn(message, SessionGuardWarning, stacklevel=3)
        return
    module = os.path.splitext(os.path.basename(path))[0]
    for name, loaded in list(sys.modules.items()):
        if getattr(loaded, "__file__", None) == path:
            module = name
            break
    warnings.warn_explicit(message, SessionGuardWarning, path, int(line), module=module)


class Guard(_stale.ReadObserver):
    """
    The handle of an installed guard.

    Made by :func:`install_guard`; use :meth:`uninstall` (or ``with``) to
    remove every listener it added.
    """

    def __init__(self, target: Target, config: GuardConfig) -> None:
        self._target = target
        self._config = config
        self._telemetry = Telemetry(config)
        self._counters = _Counters()
        self._findings: collections.deque[Finding] = collections.deque(
            maxlen=config.max_findings
        )
        self._findings_lock = threading.RLock()
        # Called with every finding as it is made (the pytest plugin uses it
        # to attribute findings to the running test).
        self._finding_callbacks: list[Callable[[Finding], None]] = []
        # Set by the pytest plugin while a test marked allow_stale=True runs:
        # findings are made and reported, StaleReadError is not raised.
        self._raise_excused = False
        self._sessions: weakref.WeakKeyDictionary[Session, _SessionState] = (
            weakref.WeakKeyDictionary()
        )
        self._listeners: list[tuple[weakref.ref[Any], str, Callable[..., Any]]] = []
        self._installed = False
        self._detect = config.detect_stale_reads
        self._sample_rate = config.sample_rate
        self._random = random.Random()
        self._restore_async_maker: Callable[[], None] | None = None
        self._lookup_hooked = False
        self._logged_errors: set[tuple[str, str]] = set()
        # Engines with the guard's Core listeners (writes, threads).
        self._watched_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
        # Who installed the guard on everyone's behalf (the pytest plugin):
        # install_guard() then refuses to hand it out to be uninstalled.
        self._owner: str | None = None
        self._target_finalizer: weakref.finalize[Any, Any] | None = None
        # The connections of tracked transactions, to attribute Core DML.
        self._connections: weakref.WeakKeyDictionary[
            Connection, weakref.ref[Session]
        ] = weakref.WeakKeyDictionary()

    # -- public API -------------------------------------------------------

    @property
    def config(self) -> GuardConfig:
        """The configuration this guard was installed with."""
        return self._config

    @property
    def installed(self) -> bool:
        """
        Whether the guard's listeners are in place.

        False after :meth:`uninstall`, and also when something else removed
        them (SQLAlchemy's own test fixtures clear every ORM listener between
        tests): the guard then sees nothing, and says so.
        """
        if not self._installed:
            return False
        for target_ref, identifier, function in self._listeners:
            target = target_ref()
            if target is not None and not event.contains(target, identifier, function):
                return False
        return not self._lookup_hooked or _stale.hooks_in_place()

    @property
    def target(self) -> str:
        """A description of what the guard was installed on."""
        return self._target.description

    @property
    def findings(self) -> list[Finding]:
        """The findings so far, newest last, at most ``config.max_findings``."""
        with self._findings_lock:
            return list(self._findings)

    def stats(self) -> GuardStats:
        """A snapshot of the counters."""
        return self._counters.snapshot()

    def clear(self) -> None:
        """Forget the findings and reset the counters."""
        with self._findings_lock:
            self._findings.clear()
        self._counters.reset()

    def verify(self, session: Any) -> list[StaleRead]:
        """
        Check every loaded object of *session*'s identity map now.

        *session* may be a Session or an AsyncSession (call it inside
        ``await async_session.run_sync(lambda s: guard.verify(s))`` for an
        async driver). Findings are recorded and logged, never raised.
        """
        sync_session = getattr(session, "sync_session", session)
        if not isinstance(sync_session, Session):
            raise TypeError(
                f"Guard.verify() needs a Session or AsyncSession, not {session!r}"
            )
        hits = [_stale.Hit(state) for state in sync_session.identity_map.all_states()]
        return self._check(sync_session, hits, raise_stale=False)

    def uninstall(self) -> None:
        """Remove every listener and hook this guard added; idempotent."""
        with _installed_lock:
            if not self._installed:
                return
            self._installed = False
            key = self._target.key
            if key is not None and _installed.get(key) is self:
                del _installed[key]
            _live.discard(self)
        for target_ref, identifier, function in reversed(self._listeners):
            target = target_ref()
            if target is not None and event.contains(target, identifier, function):
                event.remove(target, identifier, function)
        self._listeners.clear()
        if self._target_finalizer is not None:
            self._target_finalizer.detach()
            self._target_finalizer = None
        if self._lookup_hooked:
            _stale.release_hooks(self)
            self._lookup_hooked = False
        if self._restore_async_maker is not None:
            self._restore_async_maker()
            self._restore_async_maker = None
        for state in list(self._sessions.values()):
            # Transactions still open: end their spans, drop their finalizers.
            if state.finalizer is not None:
                state.finalizer.detach()
                state.finalizer = None
            if state.span is not None:
                span, state.span = state.span, None
                with contextlib.suppress(Exception):
                    span.end()
        self._sessions.clear()
        self._connections.clear()
        self._watched_engines.clear()

    def __enter__(self) -> Guard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    def __repr__(self) -> str:
        state = "installed" if self._installed else "uninstalled"
        return f"<Guard {state} on {self._target.description}>"

    # -- installation -----------------------------------------------------

    def _install(self) -> None:
        target = self._target
        if target.async_maker is not None:
            maker_ref = weakref.ref(target.async_maker)
            missing = object()
            previous = target.async_maker.kw.get("sync_session_class", missing)
            target.async_maker.kw["sync_session_class"] = target.listen_on

            def restore() -> None:
                maker = maker_ref()
                if maker is None:
                    return
                if previous is missing:
                    maker.kw.pop("sync_session_class", None)
                else:
                    maker.kw["sync_session_class"] = previous

            self._restore_async_maker = restore
        listen_on = target.listen_on
        self._listen(listen_on, "after_begin", self._after_begin)
        self._listen(listen_on, "after_commit", self._after_commit)
        self._listen(listen_on, "after_rollback", self._after_rollback)
        self._listen(listen_on, "after_transaction_end", self._after_transaction_end)
        self._listen(listen_on, "do_orm_execute", self._do_orm_execute)
        if self._detect or "request" in self._config.expire:
            self._lookup_hooked = True
            _stale.acquire_hooks(self)
        self._installed = True
        if target.engine is not None:
            self._watch_engine(target.engine)

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
        with _installed_lock:
            if engine in self._watched_engines or not self._installed:
                return
            self._watched_engines.add(engine)
            if self._detect:
                self._listen(engine, "before_execute", self._before_core_execute)
            self._listen(engine, "before_cursor_execute", self._before_cursor_execute)
            self._listen(engine, "after_cursor_execute", self._leave_connection)
            self._listen(engine, "handle_error", self._statement_failed)

    def _listen(
        self, target: Any, identifier: str, function: Callable[..., Any]
    ) -> None:
        event.listen(target, identifier, function)
        self._listeners.append((weakref.ref(target), identifier, function))

    # -- per-session state --------------------------------------------------

    def _state(self, session: Session) -> _SessionState:
        state = self._sessions.get(session)
        if state is None:
            state = self._sessions.setdefault(session, _SessionState())
        return state

    def _on_engine(self, bind: Engine | Connection) -> bool:
        return bind.engine is self._target.engine

    # -- transaction listeners -----------------------------------------------

    @_fail_open
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
        state.system = db_system_name(connection.dialect)
        state.namespace = connection.engine.url.database
        size = len(session.identity_map)
        state.identity_map = session.identity_map
        state.max_identity_map_size = size
        self._counters.add("transactions")
        self._counters.high_water("max_identity_map_size", size)
        span = self._telemetry.transaction_begun(session.hash_key, size)
        state.span = span
        # A session dropped in the middle of a transaction fires no event:
        # end its span (and count it) when it is collected.
        state.finalizer = weakref.finalize(
            session,
            self._abandoned,
            span,
            session.hash_key,
            state.began_at,
            state.system,
            state.namespace,
        )
        self._connections[connection] = weakref.ref(session)
        self._watch_engine(connection.engine)
        self._check_request(session, state)
        if "begin" in self._config.expire:
            self._expire(session, "begin")

    def _tracked(self, session: Session) -> _SessionState | None:
        """The session's state if its current root transaction is tracked."""
        state = self._sessions.get(session)
        if state is None or state.transaction is None:
            return None
        if session.in_nested_transaction():
            return None  # a SAVEPOINT ending, not the transaction
        if state.transaction() is not session.get_transaction():
            return None
        return state

    @_fail_open
    def _after_commit(self, session: Session) -> None:
        state = self._tracked(session)
        if state is None:
            return
        if "commit" in self._config.expire and not session.expire_on_commit:
            self._expire(session, "commit")
        self._finish(session, state, "commit")

    @_fail_open
    def _after_rollback(self, session: Session) -> None:
        state = self._tracked(session)
        if state is not None:
            self._finish(session, state, "rollback")

    @_fail_open
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

    def _finish(self, session: Session, state: _SessionState, outcome: str) -> None:
        state.transaction = None
        state.inside.clear()
        if state.finalizer is not None:
            state.finalizer.detach()
            state.finalizer = None
        statements = state.statements - state.statements_at_begin
        state.statements_at_begin = state.statements
        size = max(len(session.identity_map), state.max_identity_map_size)
        held, state.identity_map = state.identity_map, None
        if held is not None and held is not session.identity_map:
            size = max(size, len(held))
        self._counters.add("commits" if outcome == "commit" else "rollbacks")
        self._counters.high_water("max_identity_map_size", size)
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

    def _abandoned(
        self,
        span: Span,
        session_id: int,
        began_at: float,
        system: str,
        namespace: str | None,
    ) -> None:
        """A session was garbage-collected inside a transaction."""
        if not self._installed:
            return
        self._counters.add("rollbacks")
        self._telemetry.transaction_ended(
            span,
            session_id=session_id,
            outcome="rollback",
            identity_map_size=0,
            statements=0,
            duration_s=time.perf_counter() - began_at,
            system=system,
            namespace=namespace,
            stale_reads=0,
        )

    # -- expiry ---------------------------------------------------------------

    def _expire(self, session: Session, reason: str) -> None:
        """``expire_all()`` that leaves objects with unflushed changes alone."""
        identity_map = session.identity_map
        modified = identity_map._modified
        keep: set[InstanceState[Any]] = {instance_state(o) for o in session.deleted}
        if session._flushing:
            # A flush that autobegins the transaction is already working on
            # these objects; expiring them would make it reload them mid-flush.
            keep.update(modified)
        else:
            keep.update(
                instance_state(obj) for obj in session.dirty if session.is_modified(obj)
            )
        expired = 0
        for state in identity_map.all_states():
            if state in keep:
                continue
            state._expire(state.dict, modified)
            expired += 1
        self._counters.add("expire_all_calls")
        self._telemetry.expired(session.hash_key, reason, expired, len(keep))

    def _check_request(self, session: Session, state: _SessionState) -> None:
        """Notice a session that moved into another request context."""
        request = current_request()
        if request is None or request is state.request:
            return
        previous = state.request
        state.request = request
        expire = "request" in self._config.expire
        if previous is None:
            # First use inside a request context. A session used before any
            # (warmed up at start-up, say) brings that state in: expire it.
            if expire and len(session.identity_map):
                self._expire(session, "request")
            return
        pending = (
            len(session.new)
            + len(session.deleted)
            + sum(1 for obj in session.dirty if session.is_modified(obj))
        )
        if pending or not expire:
            self._record(
                SharedSession(
                    session_id=session.hash_key,
                    location=_user_location(),
                    request_id=request.request_id,
                    previous_request_id=getattr(previous, "request_id", None),
                    pending_objects=pending,
                )
            )
        if expire:
            self._expire(session, "request")

    # -- statements -----------------------------------------------------------

    @_fail_open
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

    def _internal_error(self, where: str, error: BaseException) -> None:
        self._counters.add("internal_errors")
        # Logged once per place and kind of error (with its traceback): a
        # listener that fails for every statement must not flood the log.
        kind = (where, type(error).__name__)
        if kind in self._logged_errors:
            return
        self._logged_errors.add(kind)
        # If the logger itself is what broke, the counter is all that is left.
        with contextlib.suppress(Exception):
            self._telemetry.internal_error(where, error)

    def _check(
        self, session: Session, hits: list[_stale.Hit], *, raise_stale: bool
    ) -> list[StaleRead]:
        started = time.perf_counter()
        outcome = _stale.check_hits(
            session, hits, self._config, location=_user_location
        )
        duration = time.perf_counter() - started if outcome.verified else None
        counters = self._counters
        if outcome.hits:
            counters.add("identity_map_hits", sum(outcome.hits.values()))
        if outcome.verified:
            counters.add("verified_objects", sum(outcome.verified.values()))
        state = self._sessions.get(session)
        if state is not None and state.transaction is not None:
            system = state.system
        else:
            system = db_system_name(outcome.dialect or "")
        self._telemetry.checked(system, outcome.hits, outcome.verified, duration)
        skipped = (
            outcome.skipped_outside_greenlet
            + outcome.skipped_identity_token
            + outcome.skipped_partial_key
        )
        if skipped:
            counters.add("skipped_checks", skipped)
        for entity, error in outcome.errors:
            counters.add("verification_errors")
            self._telemetry.verification_error(session.hash_key, entity, error)
        request = current_request()
        findings = []
        for found in outcome.findings:
            finding = found
            if request is not None:
                finding = dataclasses.replace(found, request_id=request.request_id)
            findings.append(finding)
            counters.add("stale_reads")
            if state is not None and state.transaction is not None:
                state.stale_reads += 1
            self._record(finding, state, system)
        if (
            findings
            and raise_stale
            and self._config.on_stale == "raise"
            and not self._raise_excused
        ):
            error = StaleReadError(findings[0])
            self._telemetry.stale_error(
                state.span if state is not None else None, error
            )
            raise error
        return findings

    def _record(
        self,
        finding: Finding,
        state: _SessionState | None = None,
        system: str | None = None,
    ) -> None:
        with self._findings_lock:
            self._findings.append(finding)
        span = state.span if state is not None else None
        self._telemetry.finding(finding, span, system)
        for callback in self._finding_callbacks:
            callback(finding)
        if self._config.on_stale == "warn":
            message = (
                finding.describe()
                if isinstance(finding, StaleRead)
                else f"sessionguard {finding.kind}: {finding.to_dict()}"
            )
            _warn_at(message, finding.location)

    # -- two threads inside one session at once ---------------------------------

    def _inside_state(self, connection: Connection | None) -> _SessionState | None:
        session_ref = self._connections.get(connection) if connection else None
        session = session_ref() if session_ref is not None else None
        if session is None:
            return None
        state = self._sessions.get(session)
        if state is None or state.transaction is None:
            return None
        return state

    def _enter_connection(self, connection: Connection, state: _SessionState) -> None:
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

    @_fail_open
    def _leave_connection(self, connection: Connection, *args: Any) -> None:
        state = self._inside_state(connection)
        if state is not None:
            self._leave(state)

    @_fail_open
    def _statement_failed(self, context: Any) -> None:
        state = self._inside_state(getattr(context, "connection", None))
        if state is not None:
            self._leave(state)

    @staticmethod
    def _leave(state: _SessionState) -> None:
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

    # -- writes that bypass the session -------------------------------------

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

    @_fail_open
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

    @_fail_open
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

    # -- Session.get() and many-to-one hits (the identity-lookup hook) --------

    @_fail_open
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

    @_fail_open
    def identity_hit(self, session: Session, hit: _stale.Hit) -> None:
        self._check(session, [hit], raise_stale=True)

    # -- ORM statements' objects (the read hook) ------------------------------

    @_fail_open
    def covers_statement(self, session: Session, connection: Connection) -> bool:
        # Sampling first: an unsampled statement costs one random number.
        if not self._detect or (
            self._sample_rate < 1.0 and self._random.random() >= self._sample_rate
        ):
            return False
        if not self._installed or not self._target.covers(session):
            return False
        return not self._target.engine_scoped or self._on_engine(connection)

    @_fail_open
    def statement_hits(self, session: Session, hits: list[_stale.Hit]) -> None:
        self._check(session, hits, raise_stale=True)

    def internal_error(self, where: str, error: BaseException) -> None:
        self._internal_error(where, error)


def install_guard(
    target: object = None, /, *, config: GuardConfig | None = None, **overrides: Any
) -> Guard:
    """
    Install a guard on *target* and return its :class:`Guard`.

    *target* is ``None`` (every session), an ``Engine`` or ``AsyncEngine``, a
    ``sessionmaker`` or ``async_sessionmaker``, a ``scoped_session``, a
    ``Session`` subclass, or a ``Session`` or ``AsyncSession`` instance.
    *overrides* are :class:`GuardConfig` fields. Installing again on the same
    target returns the installed guard when the configuration is the same and
    raises :class:`SessionGuardError` when it differs.
    """
    fields = {field.name for field in dataclasses.fields(GuardConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"install_guard() got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(sorted(fields))}"
        )
    if config is not None and not isinstance(config, GuardConfig):
        raise TypeError(f"config must be a GuardConfig, not {type(config).__name__}")
    requested = config
    if overrides:
        requested = dataclasses.replace(config or GuardConfig(), **overrides)
    resolved = resolve_target(target)
    with _installed_lock:
        existing = _installed.get(resolved.key)
        if existing is not None and not existing.installed:
            # Its listeners were removed behind its back: clean up what is
            # left of it and install anew rather than hand out a deaf guard.
            existing.uninstall()
            existing = None
        if existing is not None and existing._owner is not None:
            raise SessionGuardError(
                f"{existing._owner} has installed a guard on {resolved.description}; "
                "use it (in tests: the `sessionguard` fixture) instead of "
                "installing another, which would uninstall it for everyone"
            )
        if existing is not None:
            if requested is None or requested == existing.config:
                return existing
            raise SessionGuardError(
                f"a guard with another configuration is already installed on "
                f"{resolved.description}; call its uninstall() first "
                f"(installed: {existing.config!r})"
            )
        guard = Guard(resolved, requested or GuardConfig())
        guard._install()
        _installed[resolved.key] = guard
        _live.add(guard)
        if isinstance(resolved.key, (Session, Engine)):
            # A Session or engine that is collected takes its guard with it:
            # the process-wide hooks are released. (The sessions of a dropped
            # async_sessionmaker live on, and stay guarded.)
            guard._target_finalizer = weakref.finalize(resolved.key, guard.uninstall)
    return guard


def install_from_env(
    target: object = None, /, *, environ: Mapping[str, str] | None = None
) -> Guard | None:
    """
    Install a guard configured by ``SESSIONGUARD`` and ``SESSIONGUARD_*``.

    Returns ``None`` (and installs nothing) when ``SESSIONGUARD`` is off.
    """
    env = os.environ if environ is None else environ
    if parse_mode(env.get("SESSIONGUARD", ""), "SESSIONGUARD") is Mode.OFF:
        return None
    return install_guard(target, config=GuardConfig.from_env(env))
