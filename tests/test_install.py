"""install_guard on every target kind, scoping, double installs and uninstall."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from sessionguard import (
    ConfigError,
    Guard,
    GuardConfig,
    SessionGuardError,
    StaleRead,
    _session_hooks,
    _stale,
    install_guard,
)

from .models import Address, User

_ORIGINAL_IDENTITY_LOOKUP = Session.__dict__["_identity_lookup"]


def _rename(db: Any, name: str) -> None:
    # Core, not a Session: a guard on every session must not count the writer.
    with db.engine().begin() as connection:
        connection.execute(update(User).where(User.id == 1).values(name=name))


def _stale_read_through(db: Any, session: Any) -> tuple[User, str]:
    """Load user 1, let another connection rename it, read it again by get()."""
    user = session.get(User, 1)
    session.commit()
    _rename(db, "bob")
    again = session.get(User, 1)
    assert again is user
    return user, again.name


SYNC_TARGETS = [
    "engine",
    "sessionmaker",
    "scoped_session",
    "session_subclass",
    "session_instance",
    "none",
]


def _sync_setup(kind: str, db: Any) -> tuple[Any, Any]:
    """(the install target, a session the target covers)."""
    engine = db.engine()
    if kind == "engine":
        return engine, Session(engine, expire_on_commit=False)
    if kind == "sessionmaker":
        maker = sessionmaker(engine, expire_on_commit=False)
        return maker, maker()
    if kind == "scoped_session":
        scoped = scoped_session(sessionmaker(engine, expire_on_commit=False))
        return scoped, scoped()
    if kind == "session_subclass":

        class MySession(Session):
            pass

        return MySession, MySession(engine, expire_on_commit=False)
    if kind == "session_instance":
        session = Session(engine, expire_on_commit=False)
        return session, session
    assert kind == "none"
    return None, Session(engine, expire_on_commit=False)


@pytest.mark.parametrize("kind", SYNC_TARGETS)
def test_every_sync_target_kind_tracks_and_detects(db, seed, kind):
    """Each sync target kind sees transactions and statements and catches a stale get()."""
    seed(db)
    target, session = _sync_setup(kind, db)
    guard = install_guard(target)
    user, seen = _stale_read_through(db, session)
    assert seen == "alice"  # the stale value really reached the caller
    stats = guard.stats()
    assert stats.transactions == 1
    assert stats.commits == 1
    assert stats.statements == 1
    [finding] = guard.findings
    assert isinstance(finding, StaleRead)
    assert (finding.entity, finding.identity) == ("User", (1,))
    session.close()
    del user


@pytest.mark.parametrize(
    ("kind", "other"),
    [
        ("sessionmaker", "plain"),
        ("session_subclass", "plain"),
        ("session_instance", "second"),
        ("engine", "other_engine"),
    ],
)
def test_target_does_not_cover_other_sessions(db, seed, kind, other):
    """A guard leaves alone the sessions its target does not cover."""
    seed(db)
    target, _ = _sync_setup(kind, db)
    guard = install_guard(target)
    engine = db.engine()
    session = Session(engine, expire_on_commit=False)
    user, seen = _stale_read_through(db, session)
    assert seen == "alice"
    assert guard.stats() == type(guard.stats())()
    assert guard.findings == []
    session.close()
    del user


ASYNC_TARGETS = ["async_engine", "async_sessionmaker", "async_session", "none"]


async def _async_scenario(db: Any, kind: str) -> tuple[Guard, str, int]:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    engine = db.async_engine()
    if kind == "async_engine":
        target: Any = engine
        session = AsyncSession(engine, expire_on_commit=False)
    elif kind == "async_sessionmaker":
        # Covers the sessions the maker makes once the guard is installed.
        target = async_sessionmaker(engine, expire_on_commit=False)
        install_guard(target)
        session = target()
    elif kind == "async_session":
        session = AsyncSession(engine, expire_on_commit=False)
        target = session
    else:
        target = None
        session = AsyncSession(engine, expire_on_commit=False)
    guard = install_guard(target)
    user = await session.get(User, 1)
    await session.commit()
    _rename(db, "bob")
    again = await session.get(User, 1)
    assert again is user
    seen = again.name
    scalars = (await session.scalars(select(User))).one()
    assert scalars is user
    await session.close()
    findings = len(guard.findings)
    await engine.dispose()
    return guard, seen, findings


@pytest.mark.parametrize("kind", ASYNC_TARGETS)
def test_every_async_target_kind_detects(db, seed, kind):
    """AsyncEngine, async_sessionmaker, AsyncSession and None catch async stale reads."""
    seed(db)
    guard, seen, findings = asyncio.run(_async_scenario(db, kind))
    assert seen == "alice"
    assert findings == 2  # the get() and the select()
    assert guard.stats().transactions == 2
    assert guard.stats().stale_reads == 2


def test_async_sessionmaker_guard_is_local_and_restored(sqlite_db):
    """The async_sessionmaker guard covers that maker only and restores it on uninstall."""
    from sqlalchemy.ext.asyncio import async_sessionmaker

    engine = sqlite_db.async_engine()
    maker = async_sessionmaker(engine)
    other = async_sessionmaker(engine)
    guard = install_guard(maker)
    assert issubclass(maker.kw["sync_session_class"], Session)

    async def run() -> None:
        async with maker() as session:
            await session.scalars(select(User))
        async with other() as session:
            await session.scalars(select(User))
        await engine.dispose()

    asyncio.run(run())
    assert guard.stats().statements == 1
    guard.uninstall()
    assert "sync_session_class" not in maker.kw


def test_multi_bind_session_counts_only_the_guarded_engine(db, seed):
    """An engine guard covers a multi-bind session's statements on that engine only."""
    seed(db)
    users_engine, addresses_engine = db.engine(), db.engine()
    guard = install_guard(users_engine)
    session = Session(
        binds={User: users_engine, Address: addresses_engine}, expire_on_commit=False
    )
    assert session.bind is None
    user = session.get(User, 1)
    address = session.get(Address, 1)
    session.commit()
    _rename(db, "bob")
    assert session.get(User, 1).name == "alice"
    assert session.scalars(select(Address)).one() is address
    assert guard.stats().statements == 1  # the first get(User); Address not ours
    assert [f.entity for f in guard.findings] == ["User"]
    session.close()
    del user


def test_savepoint_joined_test_session_is_covered(db, seed):
    """The test-suite recipe Session(bind=conn, join_transaction_mode=...) is covered."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    connection = engine.connect()
    outer = connection.begin()
    session = Session(
        bind=connection,
        join_transaction_mode="create_savepoint",
        expire_on_commit=False,
    )
    user = session.get(User, 1)
    session.commit()  # releases the savepoint; the outer transaction goes on
    assert outer.is_active
    _rename(db, "bob")
    assert session.get(User, 1).name == "alice"
    assert guard.stats().transactions == 1
    assert guard.stats().commits == 1
    [finding] = guard.findings
    assert finding.entity == "User"
    session.close()
    outer.rollback()
    connection.close()
    del user


@pytest.mark.parametrize(
    ("target", "named"),
    [
        (42, "builtins.int (42)"),
        ("sqlite://", "builtins.str ('sqlite://')"),
        (User, "the class tests.models.User"),
        (object, "the class builtins.object"),
    ],
)
def test_bad_target_is_a_type_error_naming_it(target, named):
    """A wrong target raises TypeError naming what was given and what is accepted."""
    with pytest.raises(TypeError) as info:
        install_guard(target)
    message = str(info.value)
    assert named in message
    assert "an Engine" in message
    assert "async_sessionmaker" in message


def test_unknown_option_is_a_type_error_listing_valid_ones():
    """An unknown keyword names itself and the valid GuardConfig fields."""
    with pytest.raises(TypeError, match=r"'on_stael'.*valid options: .*on_stale"):
        install_guard(None, on_stael="raise")


def test_bad_option_value_is_a_config_error():
    """A bad keyword value is a ConfigError naming field, value and choices."""
    with pytest.raises(ConfigError, match=r"on_stale='explode'.*log, warn, raise"):
        install_guard(None, on_stale="explode")


def test_installing_twice_returns_the_guard_or_refuses(sqlite_db):
    """The same target gives the same guard; another configuration is refused."""
    engine = sqlite_db.engine()
    guard = install_guard(engine, sample_rate=0.5)
    assert install_guard(engine) is guard
    assert install_guard(engine, sample_rate=0.5) is guard
    assert install_guard(engine, config=GuardConfig(sample_rate=0.5)) is guard
    with pytest.raises(SessionGuardError, match="already installed"):
        install_guard(engine, sample_rate=0.25)
    with Session(engine) as session:
        session.scalars(select(User)).all()
    assert guard.stats().statements == 1  # one set of listeners, not two


def test_same_class_target_through_maker_and_scoped_session_is_one_guard(sqlite_db):
    """A sessionmaker and a scoped_session over it are the same target."""
    maker = sessionmaker(sqlite_db.engine())
    guard = install_guard(maker)
    assert install_guard(scoped_session(maker)) is guard
    assert install_guard(maker.class_) is guard


def test_uninstall_restores_everything_and_is_idempotent(sqlite_db, seed):
    """uninstall() removes every listener and hook, also for existing sessions."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    session = Session(engine, expire_on_commit=False)
    user = session.get(User, 1)
    guard = install_guard(None, expire={"commit"})
    listeners = list(guard._listeners)
    assert listeners
    assert Session.__dict__["_identity_lookup"] is not _ORIGINAL_IDENTITY_LOOKUP
    guard.uninstall()
    guard.uninstall()
    assert not guard.installed
    for target_ref, identifier, function in listeners:
        assert not event.contains(target_ref(), identifier, function)
    assert Session.__dict__["_identity_lookup"] is _ORIGINAL_IDENTITY_LOOKUP
    assert _stale._hooks.users == 0
    session.commit()
    _rename(sqlite_db, "bob")
    assert session.get(User, 1).name == "alice"
    assert guard.stats().transactions == 0
    assert guard.findings == []
    assert "name" in user.__dict__  # no enforced expiry after uninstall
    session.close()
    assert install_guard(None) is not guard


def test_context_manager_uninstalls_on_exit(sqlite_db):
    """Using the guard as a context manager uninstalls it on exit."""
    with install_guard(sqlite_db.engine()) as guard:
        assert guard.installed
    assert not guard.installed


def test_guard_keeps_no_session_alive(sqlite_db, seed):
    """200 sessions opened and closed under a guard are all garbage-collected."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine, expire={"begin"})
    refs = []
    keys = []
    for _ in range(200):
        session = Session(engine)
        keys.append(session.hash_key)
        user = session.get(User, 1)
        assert user is not None
        session.commit()
        session.scalars(select(User)).all()
        session.close()
        refs.append(weakref.ref(session))
        del session, user
    gc.collect()
    assert [ref for ref in refs if ref() is not None] == []
    assert len(guard._sessions) == 0
    assert not set(keys) & set(_session_hooks._watched)  # the statement hook too
    assert guard.stats().transactions == 400


def test_a_guard_keeps_its_own_target_collectable(sqlite_db):
    """A guard on a Session or an Engine does not keep it alive, and goes with it."""
    from sqlalchemy import create_engine

    session = Session(sqlite_db.engine())
    guard = install_guard(session)
    session_ref = weakref.ref(session)
    session.close()
    del session
    engine = create_engine(sqlite_db.url)
    engine_guard = install_guard(engine)
    with engine.connect():
        pass
    engine_ref = weakref.ref(engine)
    engine.dispose()
    del engine
    gc.collect()
    assert session_ref() is None
    assert engine_ref() is None
    # A guard whose target is gone uninstalls itself, process-wide hooks too.
    assert not guard.installed
    assert not engine_guard.installed
    assert _stale._hooks.users == 0
    guard.uninstall()  # still safe to call


def test_core_listeners_only_on_connections_handed_to_user_code(sqlite_db):
    """
    No listener on the Engine class nor on an engine: the sessions' own
    connections stay off SQLAlchemy's event path; only a connection user code
    gets from session.connection() is listened on, and a write through it or
    through session.execute() is still seen.
    """
    from sqlalchemy import Engine, text

    used = sqlite_db.engine()
    guard = install_guard(None)
    with Session(used) as session:
        session.add(User(id=1, name="alice"))
        session.commit()
        user = session.get(User, 1)
        session.execute(text("UPDATE sg_users SET name = 'bob'"))
        assert user.name == "alice"
        own = session.connection()  # the transaction's connection, handed out
        assert not used._has_events
        assert own._has_events  # listened on now, this one connection only
        assert event.contains(own, "before_execute", guard._before_core_execute)
        own.execute(text("UPDATE sg_users SET name = 'carol' WHERE id = 1"))
        session.rollback()
    with used.connect() as other:
        assert not other._has_events
    assert not event.contains(Engine, "before_execute", guard._before_core_execute)
    assert not event.contains(used, "before_execute", guard._before_core_execute)
    assert [(f.kind, f.table, f.statement) for f in guard.findings] == [
        ("unsynchronized_write", "sg_users", "text"),
    ]
    with Session(used) as session:
        user = session.get(User, 1)
        connection = session.connection()
        connection.exec_driver_sql("UPDATE sg_users SET name = 'dave' WHERE id = 1")
        assert user.name == "alice"
        guard.uninstall()
        assert not event.contains(
            connection, "before_execute", guard._before_core_execute
        )
    assert [f.statement for f in guard.findings] == ["text", "driver_sql"]
