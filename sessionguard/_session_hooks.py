"""
Process-wide hooks on three ``Session`` methods, for what no session event
tells: which threads are inside a session right now (``cross_thread``), and
which connections user code was handed (writes that bypass the session).

- ``Session._execute_internal`` (every ``execute()``, ``scalars()``,
  ``get()`` that emits SQL, lazy load, legacy ``Query``) and ``Session._flush``
  (a flush with something to flush: explicit, autoflush, commit) run inside a
  bracket that records the calling
  thread for sessions a guard watches. A second thread entering while the
  first is still inside is an overlap; a session handed from thread to thread
  is used by one thread at a time and never overlaps.
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
    "leave",
    "release",
    "watch_threads",
]

_get_ident = threading.get_ident

# session.hash_key -> {thread ident: how deep that thread is inside}. Only
# sessions a guard has seen have an entry; the rest pay one dict lookup.
_inside: dict[int, dict[int, int]] = {}

# What a guard raises on purpose: on_stale="warn" under warnings as errors.
_ASKED_FOR = (StaleReadError, Warning)


class SessionObserver:
    """A guard, as these hooks see it."""

    def threads_overlap(self, session: Session, first_thread: str) -> None:
        """A second thread entered *session* while *first_thread* was inside."""
        raise NotImplementedError

    def connection_handed_out(self, session: Session, connection: Connection) -> None:
        """``session.connection()`` returned *connection* to user code."""
        raise NotImplementedError

    def internal_error(self, where: str, error: BaseException) -> None:
        """A shared hook failed; it carried on as if it were not there."""
        raise NotImplementedError


class _Hooks:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users = 0
        self.observers: tuple[SessionObserver, ...] = ()
        self.originals: dict[str, Callable[..., Any]] = {}


_hooks = _Hooks()


def watch_threads(session: Session) -> None:
    """Bracket *session*'s statements and flushes from now on."""
    _inside.setdefault(session.hash_key, {})


def forget(session_id: int) -> None:
    """*session_id*'s session is gone (or no guard watches it any more)."""
    _inside.pop(session_id, None)


def enter(session: Session) -> None:
    """The calling thread goes inside *session* (if it is watched)."""
    inside = _inside.get(session.hash_key)
    if inside is None:
        return
    me = _get_ident()
    depth = inside.get(me, 0)
    inside[me] = depth + 1
    if not depth and len(inside) > 1:
        _overlap(session, inside, me)


def leave(session: Session) -> None:
    """The calling thread comes out of what :func:`enter` entered."""
    inside = _inside.get(session.hash_key)
    if inside is None:
        return
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


def _bracketed(name: str) -> Callable[..., Any]:
    def bracketed(self: Session, *args: Any, **kwargs: Any) -> Any:
        original = _hooks.originals[name]
        inside = _inside.get(self.hash_key)
        if inside is None:
            return original(self, *args, **kwargs)
        me = _get_ident()
        depth = inside.get(me, 0)
        inside[me] = depth + 1
        try:
            if not depth and len(inside) > 1:
                _overlap(self, inside, me)
            return original(self, *args, **kwargs)
        finally:
            if depth:
                inside[me] = depth
            else:
                inside.pop(me, None)

    bracketed.__name__ = bracketed.__qualname__ = name
    return bracketed


def _connection(self: Session, *args: Any, **kwargs: Any) -> Any:
    connection = _hooks.originals["connection"](self, *args, **kwargs)
    for observer in _hooks.observers:
        # Fail-open by itself.
        observer.connection_handed_out(self, connection)
    return connection


_WRAPPERS: dict[str, tuple[Callable[..., Any], list[str]]] = {
    # name: (wrapper, the leading parameters SQLAlchemy's method must have)
    "_execute_internal": (_bracketed("_execute_internal"), ["self", "statement"]),
    # _flush, not flush: flush() returns at once when there is nothing to
    # flush (every commit calls it), and raises by itself for a second
    # flush while one is running.
    "_flush": (_bracketed("_flush"), ["self", "objects"]),
    "connection": (_connection, ["self", "bind_arguments"]),
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
            for name, (wrapper, leading) in _WRAPPERS.items():
                original = Session.__dict__.get(name)
                if original is wrapper:
                    continue
                if original is not None and _signature_ok(original, leading):
                    _hooks.originals[name] = original
                    # Name, docstring and signature (via __wrapped__) stay
                    # SQLAlchemy's for whoever inspects the method.
                    functools.update_wrapper(wrapper, original)
                    setattr(Session, name, wrapper)
        _hooks.users += 1
        _hooks.observers = (*_hooks.observers, observer)


def release(observer: SessionObserver) -> None:
    """Undo :func:`acquire`; the wrappers go with the last guard."""
    with _hooks.lock:
        _hooks.observers = tuple(o for o in _hooks.observers if o is not observer)
        _hooks.users -= 1
        if _hooks.users == 0:
            # The originals stay known: a caller that looked the wrapper up
            # before this point still reaches SQLAlchemy's method through it.
            for name, original in _hooks.originals.items():
                if Session.__dict__.get(name) is _WRAPPERS[name][0]:
                    setattr(Session, name, original)
            _inside.clear()
