"""
What every listener family of a guard shares: its state, counters, findings.

``GuardCore`` holds a guard's state and the steps all listener families take
(record a finding, check hits, expire, notice a new request). Each family of
listeners lives in a module of its own, layered on top of it:
``_connection_listeners`` (writes that bypass the session, two threads at
once, with the process-wide ``Session`` method brackets of ``_session_hooks``),
``_transaction_listeners`` (begin, commit, rollback), and ``_read_listeners``
(ORM statements, identity lookups); ``_guard`` is the public handle.
"""

from __future__ import annotations

import atexit
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
from sqlalchemy.orm.attributes import instance_state

from . import _session_hooks, _stale
from ._context import current_request
from ._findings import (
    Finding,
    SharedSession,
    StaleRead,
)
from ._location import user_location as _user_location
from ._telemetry import Telemetry, db_system_name
from .exceptions import SessionGuardWarning, StaleReadError

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.trace import Span
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Session, SessionTransaction
    from sqlalchemy.orm.identity import IdentityMap
    from sqlalchemy.orm.state import InstanceState

    from ._config import GuardConfig
    from ._targets import Target

__all__ = ["GuardCore", "GuardStats", "SessionState", "fail_open", "installed_lock"]


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


SESSION_COUNTS = ("transactions", "commits", "rollbacks", "statements")
"""The counters each session keeps itself (SessionState), in this order: they
change with every statement and transaction, and a session is used by one
thread at a time, so they need no lock there."""
_LOCKED_COUNTS = tuple(
    field.name
    for field in dataclasses.fields(GuardStats)
    if field.name not in SESSION_COUNTS and field.name != "max_identity_map_size"
)


class _Counters:
    """
    The counters behind :class:`GuardStats`, exact across threads.

    The rare ones (hits, verifications, findings, errors) are counted here,
    under the lock. The four of :data:`SESSION_COUNTS` are kept by each
    session's state, and summed here: the live sessions', those of sessions
    gone (``retiring`` until folded into ``retired``), less what they were at
    the last :meth:`reset`.
    """

    def __init__(self) -> None:
        # Re-entrant: a finalizer run by the garbage collector inside a locked
        # block of the same thread (a session collected mid-transaction) counts.
        self.lock = threading.RLock()
        self.values = dict.fromkeys(_LOCKED_COUNTS, 0)
        self.max_identity_map_size = 0
        # db.system.name -> the SESSION_COUNTS of sessions gone.
        self.retired: dict[str, list[int]] = {}
        # States of sessions gone, not folded into `retired` yet. The garbage
        # collector's callback only appends here (no lock): folding is done
        # under the lock, by whoever reads the counts.
        self.retiring: list[SessionState] = []
        # The session counts at the last reset (GuardStats starts from zero;
        # the OpenTelemetry counter, which reads the same counts, does not).
        self.offset = [0] * len(SESSION_COUNTS)
        # Set while session_counts() sums: a fold then (an uninstall run by
        # the garbage collector in this thread) waits for the next one.
        self.counting = False

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            self.values[name] += amount

    def raise_max(self, identity_map_size: int) -> None:
        with self.lock:
            if identity_map_size > self.max_identity_map_size:  # noqa: PLR1730
                self.max_identity_map_size = identity_map_size

    def retire(self, state: SessionState) -> None:
        """*state*'s session is gone: its counts move to ``retired``."""
        self.retiring.append(state)

    def fold(self) -> None:
        """Move the counts of ``retiring`` into ``retired`` (lock held)."""
        if self.counting:
            return
        count = len(self.retiring)
        for state in self.retiring[:count]:
            _add_counts(self.retired, state)
            state.folded = True
        del self.retiring[:count]

    def session_counts(self, live: list[SessionState]) -> dict[str, list[int]]:
        """
        The SESSION_COUNTS by db.system.name over every session, *live* (a
        snapshot of the guard's sessions, taken before the call) and gone
        (lock held).
        """
        self.fold()
        self.counting = True
        try:
            totals = {system: list(counts) for system, counts in self.retired.items()}
            # Each state once: one collected since the snapshot of *live* was
            # taken is in `retiring` too, or was folded just now (its counts
            # are in `retired`).
            states = {id(state): state for state in live if not state.folded}
            states.update((id(state), state) for state in list(self.retiring))
            for state in states.values():
                _add_counts(totals, state)
            return totals
        finally:
            self.counting = False

    def snapshot(self, live: list[SessionState]) -> GuardStats:
        with self.lock:
            sums = _sums(self.session_counts(live))
            values: dict[str, int] = dict(self.values)
            for name, total, offset in zip(
                SESSION_COUNTS, sums, self.offset, strict=True
            ):
                values[name] = total - offset
            biggest = self.max_identity_map_size
            for state in live:
                if (
                    state.transaction is not None
                    and state.max_identity_map_size > biggest
                ):
                    biggest = state.max_identity_map_size
            values["max_identity_map_size"] = biggest
            return GuardStats(**values)

    def reset(self, live: list[SessionState]) -> None:
        with self.lock:
            self.offset = _sums(self.session_counts(live))
            self.values = dict.fromkeys(_LOCKED_COUNTS, 0)
            self.max_identity_map_size = 0


def _add_counts(totals: dict[str, list[int]], state: SessionState) -> None:
    counts = totals.get(state.system)
    if counts is None:
        counts = totals[state.system] = [0] * len(SESSION_COUNTS)
    counts[0] += state.transactions
    counts[1] += state.commits
    counts[2] += state.rollbacks
    counts[3] += state.statements


def _sums(totals: dict[str, list[int]]) -> list[int]:
    return [
        sum(counts[index] for counts in totals.values())
        for index in range(len(SESSION_COUNTS))
    ]


_FOLD_AT = 64
"""Retired session states kept before they are folded into one count."""

_NOT_CHECKED = object()
"""SessionState.bind until a statement's bind was found to be the guard's own
(never identical to a Session.bind, which may be None)."""


class SessionState:
    """What one guard knows of one session; lives as long as the session."""

    __slots__ = (
        "began_at",
        "bind",
        "commits",
        "cross_thread_reported",
        "dialect",
        "finalizer",
        "folded",
        "identity_map",
        "max_identity_map_size",
        "namespace",
        "noted",
        "reported_writes",
        "request",
        "rollbacks",
        "sampled",
        "span",
        "stale_reads",
        "statements",
        "statements_at_begin",
        "system",
        "transaction",
        "transactions",
    )

    def __init__(self) -> None:
        self.transaction: weakref.ref[SessionTransaction] | None = None
        self.began_at = 0.0
        # SESSION_COUNTS: what _Counters sums (`folded` once they are in its
        # `retired`).
        self.folded = False
        self.transactions = 0
        self.commits = 0
        self.rollbacks = 0
        self.statements = 0
        self.statements_at_begin = 0
        # Whether the current transaction is traced (span, histograms).
        self.sampled = False
        # The session.bind its statements were last seen to run on, when that
        # is the guard's engine and nothing else can choose another (no
        # per-mapper binds, get_bind() not overridden): the per-statement
        # engine filter is then one comparison.
        self.bind: object = _NOT_CHECKED
        self.cross_thread_reported = False
        # Whether the current transaction has anything of its own to forget
        # at the next begin (cross_thread_reported, stale_reads,
        # reported_writes): one test per begin instead of three resets.
        self.noted = False
        # The map at begin (close() swaps in an empty one before the
        # transaction ends) and the most objects seen at a statement: the
        # size reported is the most the session held, in O(1).
        self.identity_map: IdentityMap | None = None
        self.max_identity_map_size = 0
        self.request: object = None
        self.span: Span | None = None
        # The dialect of the session's transactions (its db.system.name):
        # the counts above are for that system.
        self.dialect: object = None
        self.system = "other_sql"
        self.namespace: str | None = None
        self.stale_reads = 0
        self.finalizer: weakref.ref[Session] | None = None
        # (table, kind of write) reported in the current transaction.
        self.reported_writes: set[tuple[str, str]] | None = None


# Re-entrant: the finalizer of a collected Session or engine target
# uninstalls its guard, and the collector can run it inside install_guard().
installed_lock = threading.RLock()


_Method = TypeVar("_Method", bound="Callable[..., Any]")


def fail_open(method: _Method) -> _Method:
    """Run a listener so that a failure of the guard never reaches the user."""

    @functools.wraps(method)
    def listener(self: GuardCore, *args: Any) -> Any:
        try:
            return method(self, *args)
        except (StaleReadError, Warning):
            raise  # asked for: on_stale="raise", or warnings turned into errors
        except Exception as error:  # noqa: BLE001 - fail open, by design
            self._internal_error(method.__name__, error)
            return None

    return listener  # type: ignore[return-value]


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


# Every guard core, for _wind_up() at interpreter exit.
_cores: weakref.WeakSet[GuardCore] = weakref.WeakSet()
_wind_up_registered = False


def _wind_up() -> None:
    """
    At interpreter exit, end the transactions that sessions still alive left
    open, as for a collected session: counted as rollbacks, spans ended.
    Registered when the first session is seen, so that it runs before the
    atexit shutdown of an OpenTelemetry SDK set up before that.
    """
    for core in list(_cores):
        for key, state in list(core._sessions.items()):
            if state.transaction is not None:
                with contextlib.suppress(Exception):
                    core._abandoned(state, key)


class GuardCore(_session_hooks.SessionObserver):
    """A guard's state and the steps its listener families share."""

    def __init__(self, target: Target, config: GuardConfig) -> None:
        _cores.add(self)
        self._target = target
        self._config = config
        self._telemetry = Telemetry(config)
        self._counters = _Counters()
        self._telemetry.count_transactions(self._transaction_counts)
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
        # By Session.hash_key (never reused in a process): a plain dict is
        # looked up without a Python call on the hot path. Each entry goes
        # when its session is collected (SessionState.finalizer).
        self._sessions: dict[int, SessionState] = {}
        self._listeners: list[tuple[weakref.ref[Any], str, Callable[..., Any]]] = []
        self._installed = False
        self._detect = config.detect_stale_reads
        self._expire_on = config.expire
        self._expire_on_begin = "begin" in config.expire
        self._expire_on_commit = "commit" in config.expire
        self._sample_rate = config.sample_rate
        self._random = random.Random()
        self._restore_async_maker: Callable[[], None] | None = None
        self._lookup_hooked = False
        self._statements_hooked = False
        self._logged_errors: set[tuple[str, str]] = set()
        # db.system.name by dialect (is_mariadb is only known once connected,
        # and a dialect connects before its first transaction begins).
        self._system_names: weakref.WeakKeyDictionary[Any, str] = (
            weakref.WeakKeyDictionary()
        )
        # The engine of an engine target, dereferenced without a property.
        engine = target.engine
        self._engine_ref: Callable[[], Engine | None] = (
            weakref.ref(engine) if engine is not None else lambda: None
        )
        self._engine_scoped = target.engine_scoped
        # Connections handed to user code (session.connection(), a session
        # bound to a Connection) that have the guard's Core listeners.
        self._watched_connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._watched_dialects: weakref.WeakSet[Any] = weakref.WeakSet()
        # Who installed the guard on everyone's behalf (the pytest plugin):
        # install_guard() then refuses to hand it out to be uninstalled.
        self._owner: str | None = None
        self._target_finalizer: weakref.finalize[Any, Any] | None = None
        # The connections of tracked transactions, to attribute Core DML.
        self._connections: weakref.WeakKeyDictionary[
            Connection, weakref.ref[Session]
        ] = weakref.WeakKeyDictionary()

    def _listen(
        self, target: Any, identifier: str, function: Callable[..., Any]
    ) -> None:
        event.listen(target, identifier, function)
        self._listeners.append((weakref.ref(target), identifier, function))

    def _state(self, session: Session) -> SessionState:
        key = session.hash_key
        state = self._sessions.get(key)
        if state is None:
            state = SessionState()
            counters = self._counters
            if len(counters.retiring) > _FOLD_AT:
                with counters.lock:
                    counters.fold()
            # One finalizer per session, not per transaction: it forgets the
            # session, and ends a transaction that a dropped session left
            # open (no event fires for it). A weak reference with a callback
            # (what weakref.finalize is made of, without its registry): the
            # state holds it, so it lives as long as the guard knows the
            # session; dropping it (uninstall) cancels the callback. Sessions
            # still alive at exit are wound up by _wind_up().
            made = state

            def collected(_ref: weakref.ref[Session]) -> None:
                self._forget(made, key)

            state.finalizer = weakref.ref(session, collected)
            state = self._sessions.setdefault(key, state)
            global _wind_up_registered  # noqa: PLW0603 - once per process
            if not _wind_up_registered:
                _wind_up_registered = True
                atexit.register(_wind_up)
            _session_hooks.watch(session, self, state)
        return state

    def _forget(self, state: SessionState, key: int) -> None:
        """A session was garbage-collected."""
        if state.transaction is not None:
            self._abandoned(state, key)
        # What the counts do not need goes now (the state waits in
        # `retiring` until folded).
        state.identity_map = state.span = state.dialect = state.request = None
        # Retired before it leaves _sessions: a snapshot of the counts taken
        # meanwhile finds it in one or both, never in neither.
        self._counters.retire(state)
        self._sessions.pop(key, None)
        _session_hooks.forget(key, self)

    def _transaction_counts(self) -> dict[str, list[int]]:
        """The sessions' counts by db.system.name, since install (never reset)."""
        live = list(self._sessions.values())
        with self._counters.lock:
            return self._counters.session_counts(live)

    def _span_of(self, state: SessionState | None) -> Span | None:
        """The span of *state*'s transaction, made now if it was not sampled."""
        if state is None or state.transaction is None:
            return None
        span = state.span
        if span is None and state.began_at and self._telemetry.live:
            # Something was found in an unsampled transaction: it gets its span.
            span = state.span = self._telemetry.late_span(state.began_at)
        return span

    def _retire_all(self) -> None:
        """Every session's counts to `retired` (uninstall: the guard lets go)."""
        counters = self._counters
        with counters.lock:
            for state in list(self._sessions.values()):
                counters.retire(state)
            self._sessions.clear()
            counters.fold()

    def _session_changed_dialect(
        self, state: SessionState, connection: Connection
    ) -> None:
        """
        *state*'s next transaction runs on *connection*'s dialect: count it
        under its system. (An engine's dialect is its own, shared only with
        the engines execution_options() derives from it, which have its URL:
        the span's db.namespace is known here too.)
        """
        dialect = connection.dialect
        state.namespace = connection.engine.url.database
        if state.dialect is None:  # the session's first transaction
            state.dialect = dialect
            state.system = self._system_name(dialect)
            return
        counters = self._counters
        with counters.lock:
            if state.dialect is not None:
                # What was counted so far stays with the previous system.
                _add_counts(counters.retired, state)
                state.statements_at_begin -= state.statements
                state.transactions = state.commits = state.rollbacks = 0
                state.statements = 0
            state.dialect = dialect
            state.system = self._system_name(dialect)

    def _abandoned(self, state: SessionState, session_id: int) -> None:
        raise NotImplementedError

    def _system_name(self, dialect: Any) -> str:
        """db.system.name of *dialect*, computed once per dialect."""
        system = self._system_names.get(dialect)
        if system is None:
            system = self._system_names[dialect] = db_system_name(dialect)
        return system

    def _on_engine(self, bind: Engine | Connection) -> bool:
        return bind.engine is self._engine_ref()

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

    def internal_error(self, where: str, error: BaseException) -> None:
        self._internal_error(where, error)

    def _check(
        self, session: Session, hits: list[_stale.Hit], *, raise_stale: bool
    ) -> list[StaleRead]:
        telemetry = self._telemetry
        timed = telemetry.live
        started = time.perf_counter() if timed else 0.0
        outcome = _stale.check_hits(
            session, hits, self._config, location=_user_location
        )
        skipped = (
            outcome.skipped_outside_greenlet
            + outcome.skipped_identity_token
            + outcome.skipped_partial_key
        )
        counters = self._counters
        with counters.lock:
            values = counters.values
            if outcome.hit_count:
                values["identity_map_hits"] += outcome.hit_count
            if outcome.verified_count:
                values["verified_objects"] += outcome.verified_count
            if skipped:
                values["skipped_checks"] += skipped
        state = self._sessions.get(session.hash_key)
        if state is not None and state.transaction is not None:
            system = state.system
        else:
            system = db_system_name(outcome.dialect or "")
        if timed:
            duration = time.perf_counter() - started if outcome.verified else None
            telemetry.checked(system, outcome.hits, outcome.verified, duration)
        for entity, error in outcome.errors:
            counters.add("verification_errors")
            telemetry.verification_error(session.hash_key, entity, error)
        if not outcome.findings:
            return []
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
                state.noted = True
            self._record(finding, state, system)
        if raise_stale and self._config.on_stale == "raise" and not self._raise_excused:
            error = StaleReadError(findings[0])
            telemetry.stale_error(self._span_of(state), error)
            raise error
        return findings

    def _record(
        self,
        finding: Finding,
        state: SessionState | None = None,
        system: str | None = None,
    ) -> None:
        with self._findings_lock:
            self._findings.append(finding)
        self._telemetry.finding(finding, self._span_of(state), system)
        for callback in self._finding_callbacks:
            callback(finding)
        if self._config.on_stale == "warn":
            message = (
                finding.describe()
                if isinstance(finding, StaleRead)
                else f"sessionguard {finding.kind}: {finding.to_dict()}"
            )
            _warn_at(message, finding.location)

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

    def _check_request(self, session: Session, state: SessionState) -> None:
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
