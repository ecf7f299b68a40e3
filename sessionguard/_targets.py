"""Resolving what ``install_guard`` was given into where its listeners go."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ACCEPTED_TARGETS", "Target", "resolve_target"]

ACCEPTED_TARGETS = (
    "None (every session), an Engine, an AsyncEngine, a sessionmaker, an "
    "async_sessionmaker, a scoped_session, an async_scoped_session, a Session "
    "subclass, a Session instance or an AsyncSession instance"
)


def _async_types() -> tuple[Any, ...] | None:
    try:
        from sqlalchemy.ext.asyncio import (
            AsyncEngine,
            AsyncSession,
            async_scoped_session,
            async_sessionmaker,
        )
    except ImportError:  # pragma: no cover - sqlalchemy.ext.asyncio always imports
        return None
    return AsyncEngine, AsyncSession, async_sessionmaker, async_scoped_session


def _weak(obj: Any) -> Callable[[], Any]:
    """A weak reference, or a stand-in for None."""
    if obj is None:
        return lambda: None
    return weakref.ref(obj)


class Target:
    """
    Where a guard listens and which sessions it covers.

    Everything is held weakly: the registry of installed guards is keyed by
    the target, and a guard must not keep its own target (a Session, an
    engine and its pool, a maker) alive.
    """

    def __init__(
        self,
        *,
        key: Any,
        listen_on: type[Session] | Session,
        description: str,
        engine: Engine | None = None,
        async_maker: Any = None,
    ) -> None:
        self._key = _weak(key)
        self._listen_on = _weak(listen_on)
        self._engine = _weak(engine)
        self._async_maker = _weak(async_maker)
        self.description = description
        """How the target is named in messages."""
        self.engine_scoped = engine is not None
        """An engine target: only statements and transactions on it are covered."""
        # The Session subclass made for an async_sessionmaker belongs to the
        # guard (the maker refers to it too); nothing else would keep it.
        self._owned_class = listen_on if async_maker is not None else None

    @property
    def key(self) -> Any:
        """What identifies the target in the registry of installed guards."""
        return self._key()

    @property
    def listen_on(self) -> Any:
        """The Session class, subclass or instance that gets the session listeners."""
        return self._listen_on()

    @property
    def engine(self) -> Engine | None:
        """The engine of an engine target (None once it is gone)."""
        engine: Engine | None = self._engine()
        return engine

    @property
    def async_maker(self) -> Any:
        """For an async_sessionmaker target: the maker whose sync class is swapped."""
        return self._async_maker()

    def covers(self, session: Session) -> bool:
        """Whether *session* gets this target's listeners (not the engine filter)."""
        listen_on = self.listen_on
        if listen_on is None:
            return False
        if isinstance(listen_on, Session):
            return session is listen_on
        return isinstance(session, listen_on)


def _describe(target: object) -> str:
    return f"{type(target).__module__}.{type(target).__qualname__} ({target!r})"


def resolve_target(target: object) -> Target:
    """Translate an ``install_guard`` target; ``TypeError`` for anything else."""
    if target is None:
        return Target(key=Session, listen_on=Session, description="every Session")
    async_types = _async_types()
    if isinstance(target, Engine):
        return Target(
            key=target, listen_on=Session, description=repr(target), engine=target
        )
    if isinstance(target, Session):
        return Target(key=target, listen_on=target, description=repr(target))
    if isinstance(target, sessionmaker):
        return Target(
            key=target.class_, listen_on=target.class_, description=repr(target)
        )
    if isinstance(target, scoped_session):
        return resolve_target(target.session_factory)
    if isinstance(target, type) and issubclass(target, Session):
        description = "every Session" if target is Session else repr(target)
        return Target(key=target, listen_on=target, description=description)
    if async_types is not None:
        async_engine, async_session, async_maker, async_scoped = async_types
        if isinstance(target, async_engine):
            sync_engine = target.sync_engine
            return Target(
                key=sync_engine,
                listen_on=Session,
                description=repr(target),
                engine=sync_engine,
            )
        if isinstance(target, async_session):
            sync = target.sync_session
            return Target(key=sync, listen_on=sync, description=repr(target))
        if isinstance(target, async_maker):
            # async_sessionmaker does not make a class of its own (sessionmaker
            # does); the guard gives it one, so that its listeners stay local.
            base = target.kw.get("sync_session_class") or getattr(
                target.class_, "sync_session_class", Session
            )
            guarded = type(f"Guarded{base.__name__}", (base,), {})
            return Target(
                key=target,
                listen_on=guarded,
                description=repr(target),
                async_maker=target,
            )
        if isinstance(target, async_scoped):
            return resolve_target(target.session_factory)
    if isinstance(target, type):
        given = f"the class {target.__module__}.{target.__qualname__}"
    else:
        given = _describe(target)
    raise TypeError(
        f"install_guard() cannot guard {given}; it accepts {ACCEPTED_TARGETS}"
    )
