"""install_guard, the Guard handle, and the bookkeeping of its listeners."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import _session_hooks, _stale
from ._config import GuardConfig, Mode, parse_mode
from ._core import GuardStats, installed_lock
from ._read_listeners import ReadListeners
from ._targets import resolve_target
from .exceptions import SessionGuardError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from ._findings import (
        Finding,
        StaleRead,
    )


__all__ = ["Guard", "GuardStats", "install_from_env", "install_guard"]


# One guard per target: listening the same function twice on a class target
# doubles it, and one remove() then leaves an orphan.
_installed: weakref.WeakKeyDictionary[Any, Guard] = weakref.WeakKeyDictionary()
# Every installed guard, also those whose target was collected before they
# were uninstalled (the test suite's clean-up walks it).
_live: set[Guard] = set()


class Guard(ReadListeners):
    """
    The handle of an installed guard.

    Made by :func:`install_guard`; use :meth:`uninstall` (or ``with``) to
    remove every listener it added.
    """

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
        if not _session_hooks.installed():
            return False
        return not self._statements_hooked or _stale.hooks_in_place()

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
        return self._counters.snapshot(list(self._sessions.values()))

    def clear(self) -> None:
        """Forget the findings and reset the counters."""
        with self._findings_lock:
            self._findings.clear()
        self._counters.reset(list(self._sessions.values()))

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
        with installed_lock:
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
        for connection in list(self._watched_connections):
            for identifier, function in self._connection_listeners():
                if event.contains(connection, identifier, function):
                    event.remove(connection, identifier, function)
        self._watched_connections.clear()
        self._watched_dialects.clear()
        if self._target_finalizer is not None:
            self._target_finalizer.detach()
            self._target_finalizer = None
        if self._lookup_hooked:
            _stale.release_hooks(self, statements=self._statements_hooked)
            self._lookup_hooked = self._statements_hooked = False
        for session_id in list(self._sessions):
            _session_hooks.forget(session_id, self)
        _session_hooks.release(self)
        if self._restore_async_maker is not None:
            self._restore_async_maker()
            self._restore_async_maker = None
        for state in list(self._sessions.values()):
            # Transactions still open: end their spans, drop their finalizers.
            state.finalizer = None  # its callback goes with it
            if state.span is not None:
                span, state.span = state.span, None
                with contextlib.suppress(Exception):
                    span.end()
        self._retire_all()
        self._telemetry.close()
        self._connections.clear()

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
        # Statements are told by the _execute_internal hook of _session_hooks,
        # not by a do_orm_execute listener, whose presence alone makes
        # SQLAlchemy prepare every ORM statement twice.
        if self._detect or "request" in self._config.expire:
            # At sample_rate=0 no statement is ever checked: the hook on every
            # ORM statement's objects (and the mapper events it needs) would
            # only cost. The identity-lookup hook still notices request
            # changes on get()s that emit no SQL.
            self._lookup_hooked = True
            self._statements_hooked = self._detect and self._sample_rate > 0
            _stale.acquire_hooks(self, statements=self._statements_hooked)
        _session_hooks.acquire(self)
        self._installed = True


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
    with installed_lock:
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
