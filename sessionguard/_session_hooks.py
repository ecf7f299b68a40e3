"""
Process-wide hooks on three ``Session`` methods: where a guard sees every
statement a session runs, which threads are inside a session right now
(``cross_thread``), and which connections user code was handed (writes that
bypass the session).

- ``Session._execute_internal`` (every ``execute()``, ``scalars()``,
  ``get()`` that emits SQL, lazy load, legacy ``Query``) tells the guards
  watching the session about the statement, before SQLAlchemy runs it: this
  is where statements are counted and writes looked at. (A ``do_orm_execute``
  listener would tell as much, but its mere presence makes SQLAlchemy build an
  ``ORMExecuteState`` and prepare each ORM statement twice: most of what
  listening to sessions at all costs.) A replay by
  ``ORMExecuteState.invoke_statement()`` is the same statement, told once.
- ``Session._execute_internal`` and ``Session._flush`` (a flush with
  something to flush: explicit, autoflush, commit) run inside a bracket that
  records the calling thread for sessions a guard watches. A second thread
  entering while the first is still inside is an overlap; a session handed
  from thread to thread is used by one thread at a time and never overlaps.
- ``Session.connection()`` tells the guards about the connection it returns:
  they listen on that one connection (not on its engine, which would put every
  connection of the engine on SQLAlchemy's slower event path).

Each wrapper calls SQLAlchemy's method with the arguments it was given and
returns (or raises) exactly what that returned (or raised). The wrappers are
installed while at least one guard is, reference counted; signatures are
checked first (the same on SQLAlchemy 2.0.x and 2.1.x).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from .exceptions import StaleReadError

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Connection

__all__ = [
    "SessionObserver",
    "acquire",
    "enter",
    "forget",
    "installed",
    "leave",
    "release",
    "watch",
]

_get_ident = threading.get_ident

# What a guard raises on purpose: on_stale="warn" under warnings as errors.
_ASKED_FOR = (StaleReadError, Warning)


class SessionObserver:
    """A guard, as these hooks see it."""

    def statement_executing(
        self, session: Session, state: Any, statement: Any, kwargs: dict[str, Any]
    ) -> None:
        """
        *session*, which this observer watches (*state* is what it keeps of
        it), is about to run *statement*; *kwargs* are the keyword arguments
        of ``Session._execute_internal`` (``bind_arguments``,
        ``execution_options``). Fails open by itself.
        """
        raise NotImplementedError

    def unwatched_statement(
        self, session: Session, statement: Any, kwargs: dict[str, Any]
    ) -> None:
        """The same, for a session this observer does not watch (yet)."""
        raise NotImplementedError

    def threads_overlap(self, session: Session, first_thread: str) -> None:
        """A second thread entered *session* while *first_thread* was inside."""
        raise NotImplementedError

    def connection_handed_out(self, session: Session, connection: Connection) -> None:
        """``session.connection()`` returned *connection* to user code."""
        raise NotImplementedError

    def internal_error(self, where: str, error: BaseException) -> None:
        """A shared hook failed; it carried on as if it were not there."""
        raise NotImplementedError


class _Watch:
    """The sessions' side of one watched session."""

    __slots__ = ("guards", "inside")

    def __init__(self) -> None:
        # {thread ident: how deep that thread is inside}
        self.inside: dict[int, int] = {}
        # (observer, what the observer keeps of the session), per observer
        # watching the session: the statement hook reaches them without a
        # lookup of its own.
        self.guards: tuple[tuple[SessionObserver, Any], ...] = ()


class _Hooks:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users = 0
        self.observers: tuple[SessionObserver, ...] = ()
        self.several = False
        """More than one observer: a session may be watched by some only."""
        self.originals: dict[str, Callable[..., Any]] = {}
        self.wrappers: dict[str, Callable[..., Any]] = {}


_hooks = _Hooks()

# session.hash_key -> _Watch. Only sessions a guard has seen have an entry;
# the rest pay one dict lookup (and, while guards are installed, ask them
# whether the session is theirs).
_watched: dict[int, _Watch] = {}


def watch(session: Session, observer: SessionObserver, state: Any) -> None:
    """Tell *observer* (with its *state*) about *session*'s statements from now on."""
    key = session.hash_key
    watched = _watched.get(key)
    if watched is None:
        made = _Watch()
        made.guards = ((observer, state),)
        watched = _watched.setdefault(key, made)
        if watched is made:
            return
    watched.guards = (
        *(entry for entry in watched.guards if entry[0] is not observer),
        (observer, state),
    )


def forget(session_id: int, observer: SessionObserver) -> None:
    """*observer* no longer watches *session_id*'s session (or it is gone)."""
    watched = _watched.get(session_id)
    if watched is None:
        return
    guards = watched.guards
    if len(guards) == 1 and guards[0][0] is observer:
        del _watched[session_id]
        return
    watched.guards = tuple(
        entry for entry in watched.guards if entry[0] is not observer
    )
    if not watched.guards:
        _watched.pop(session_id, None)


def enter(session: Session) -> None:
    """The calling thread goes inside *session* (if it is watched)."""
    watched = _watched.get(session.hash_key)
    if watched is None:
        return
    inside = watched.inside
    me = _get_ident()
    depth = inside.get(me, 0)
    inside[me] = depth + 1
    if not depth and len(inside) > 1:
        _overlap(session, inside, me)


def leave(session: Session) -> None:
    """The calling thread comes out of what :func:`enter` entered."""
    watched = _watched.get(session.hash_key)
    if watched is None:
        return
    inside = watched.inside
    me = _get_ident()
    depth = inside.get(me, 0)
    if depth > 1:
        inside[me] = depth - 1
    else:
        inside.pop(me, None)


def _thread_name(ident: int) -> str:
    for thread in threading.enumerate():
        if thread.ident == ident:
            return f"{thread.name} ({ident})"
    return f"a finished thread ({ident})"


def _overlap(session: Session, inside: dict[int, int], me: int) -> None:
    try:
        others = [ident for ident in list(inside) if ident != me]
        if not others:
            return
        first = _thread_name(others[0])
    except Exception as error:  # noqa: BLE001 - a hook fails open
        _internal_error("threads", error)
        return
    for observer in _hooks.observers:
        # Fail-open by itself; raises only what warnings-as-errors asks for.
        observer.threads_overlap(session, first)


def _internal_error(where: str, error: BaseException) -> None:
    for observer in _hooks.observers:
        with contextlib.suppress(Exception):  # nothing left to report to
            observer.internal_error(where, error)


def _unwatched(
    session: Session,
    statement: Any,
    kwargs: dict[str, Any],
    watching: tuple[tuple[SessionObserver, Any], ...] | None,
) -> None:
    """Offer a statement to the observers that do not watch its session."""
    for observer in _hooks.observers:
        if watching is not None and any(entry[0] is observer for entry in watching):
            continue
        # Fail-open by itself.
        observer.unwatched_statement(session, statement, kwargs)


def _execute_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Session._execute_internal``: statements told, threads bracketed."""

    def _execute_internal(
        self: Session, statement: Any, *args: Any, **kwargs: Any
    ) -> Any:
        watched = _watched.get(self.hash_key)
        if watched is None:
            # A session no guard watches yet (its first statement, or one no
            # guard covers): the guards look for themselves, before it runs.
            if _hooks.observers and kwargs.get("_parent_execute_state") is None:
                _unwatched(self, statement, kwargs, None)
            return original(self, statement, *args, **kwargs)
        inside = watched.inside
        me = _get_ident()
        depth = inside.get(me)
        inside[me] = 1 if depth is None else depth + 1
        try:
            if depth is None and len(inside) > 1:
                _overlap(self, inside, me)
            if kwargs.get("_parent_execute_state") is None:
                guards = watched.guards
                for observer, state in guards:
                    # Fail-open by itself; raises only what is asked for.
                    observer.statement_executing(self, state, statement, kwargs)
                if _hooks.several and len(guards) < len(_hooks.observers):
                    _unwatched(self, statement, kwargs, guards)
            return original(self, statement, *args, **kwargs)
        finally:
            if depth is None:
                inside.pop(me, None)
            else:
                inside[me] = depth

    return _execute_internal


def _bracket_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """
    A method run with the calling thread recorded inside the session.

    (The statement hook above brackets the same way, inline: one call less
    for every statement.)
    """

    def bracketed(self: Session, *args: Any, **kwargs: Any) -> Any:
        watched = _watched.get(self.hash_key)
        if watched is None:
            return original(self, *args, **kwargs)
        inside = watched.inside
        me = _get_ident()
        depth = inside.get(me)
        inside[me] = 1 if depth is None else depth + 1
        try:
            if depth is None and len(inside) > 1:
                _overlap(self, inside, me)
            return original(self, *args, **kwargs)
        finally:
            if depth is None:
                inside.pop(me, None)
            else:
                inside[me] = depth

    return bracketed


def _connection_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    def connection(self: Session, *args: Any, **kwargs: Any) -> Any:
        handed_out = original(self, *args, **kwargs)
        for observer in _hooks.observers:
            # Fail-open by itself.
            observer.connection_handed_out(self, handed_out)
        return handed_out

    return connection


_HOOKS: dict[str, tuple[Callable[..., Any], list[str]]] = {
    # name: (makes the wrapper of SQLAlchemy's method, the leading
    # parameters that method must have)
    "_execute_internal": (_execute_hook, ["self", "statement"]),
    # _flush, not flush: flush() returns at once when there is nothing to
    # flush (every commit calls it), and raises by itself for a second
    # flush while one is running.
    "_flush": (_bracket_hook, ["self", "objects"]),
    "connection": (_connection_hook, ["self", "bind_arguments"]),
}


def _signature_ok(function: Any, leading: list[str]) -> bool:
    try:
        parameters = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return parameters[: len(leading)] == leading


def acquire(observer: SessionObserver) -> None:
    """Install the wrappers (once per process) and add *observer*."""
    with _hooks.lock:
        if _hooks.users == 0:
            for name, (make, leading) in _HOOKS.items():
                original = Session.__dict__.get(name)
                if original is None or _reaches(original, _hooks.wrappers.get(name)):
                    # Ours, or someone's wrapper around ours (functools.wraps):
                    # wrapping that again would tell every statement twice.
                    continue
                if not _signature_ok(original, leading):
                    continue
                wrapper = _hooks.wrappers.get(name)
                if wrapper is None or _hooks.originals.get(name) is not original:
                    # One wrapper per original, made once: it calls that
                    # original without a lookup. Name, docstring and
                    # signature (via __wrapped__) stay SQLAlchemy's for
                    # whoever inspects the method.
                    wrapper = functools.update_wrapper(make(original), original)
                    _hooks.originals[name] = original
                    _hooks.wrappers[name] = wrapper
                setattr(Session, name, wrapper)
        _hooks.users += 1
        _hooks.observers = (*_hooks.observers, observer)
        _hooks.several = len(_hooks.observers) > 1


def _reaches(function: Any, wrapper: Any) -> bool:
    """Whether *function* is *wrapper*, or wraps it (``__wrapped__``)."""
    if wrapper is None:
        return False
    for _ in range(16):  # a chain of wrappers, not a cycle
        if function is wrapper:
            return True
        function = getattr(function, "__wrapped__", None)
        if function is None:
            return False
    return False


def installed() -> bool:
    """Whether the wrappers made by :func:`acquire` are still called."""
    return all(
        _reaches(Session.__dict__.get(name), wrapper)
        for name, wrapper in _hooks.wrappers.items()
    )


def release(observer: SessionObserver) -> None:
    """Undo :func:`acquire`; the wrappers go with the last guard."""
    with _hooks.lock:
        _hooks.observers = tuple(o for o in _hooks.observers if o is not observer)
        _hooks.several = len(_hooks.observers) > 1
        _hooks.users -= 1
        if _hooks.users == 0:
            # A caller that looked a wrapper up before this point still
            # reaches SQLAlchemy's method through it (it holds the original).
            for name, original in _hooks.originals.items():
                if Session.__dict__.get(name) is _hooks.wrappers[name]:
                    setattr(Session, name, original)
            _watched.clear()
