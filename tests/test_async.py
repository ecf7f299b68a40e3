"""AsyncSession on aiosqlite and asyncpg: hits are checked inside the greenlet."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.util.concurrency import in_greenlet

from sessionguard import Guard, StaleRead, install_guard

from .models import Address, User

TARGETS = ["AsyncEngine", "async_sessionmaker", "AsyncSession"]


def _guarded_session(db: Any, target: str) -> tuple[Any, AsyncSession, Guard]:
    """An async engine, a session on it, and a guard installed on *target*."""
    engine = db.async_engine()
    maker = async_sessionmaker(engine, expire_on_commit=False)
    if target == "AsyncEngine":
        guard = install_guard(engine)
        session = maker()
    elif target == "async_sessionmaker":
        guard = install_guard(maker)
        session = maker()  # made after install: it gets the guarded class
    else:
        session = maker()
        guard = install_guard(session)
    return engine, session, guard


def _rename_user(db: Any, name: str) -> None:
    """Commit a new name for user 1 from another connection."""
    writer = db.engine()
    with writer.begin() as connection:
        connection.execute(
            text("UPDATE sg_users SET name = :name WHERE id = 1"), {"name": name}
        )
    writer.dispose()


def _only_stale_read(guard: Guard) -> StaleRead:
    [finding] = guard.findings
    assert isinstance(finding, StaleRead)
    assert (finding.entity, finding.identity, finding.deleted) == ("User", (1,), False)
    assert [diff.name for diff in finding.attributes] == ["name"]
    return finding


@pytest.mark.parametrize("target", TARGETS)
def test_async_get_hit_is_detected(db, seed, target):
    """await session.get() answered from the map with a changed row is reported."""
    seed(db)

    async def scenario() -> Guard:
        engine, session, guard = _guarded_session(db, target)
        async with session:
            user = await session.get(User, 1)
            await session.commit()
            _rename_user(db, "bob")
            again = await session.get(User, 1)
            assert again is user
            assert again.name == "alice"  # the stale value, served from the map
        await engine.dispose()
        return guard

    guard = asyncio.run(scenario())
    _only_stale_read(guard)
    stats = guard.stats()
    assert (stats.identity_map_hits, stats.verified_objects) == (1, 1)
    assert (stats.stale_reads, stats.skipped_checks) == (1, 0)


@pytest.mark.parametrize("target", TARGETS)
def test_async_scalars_hit_is_detected(db, seed, target):
    """await session.scalars(select(...)) returning a stale map object is reported."""
    seed(db)

    async def scenario() -> Guard:
        engine, session, guard = _guarded_session(db, target)
        async with session:
            [user] = (await session.scalars(select(User))).all()
            await session.commit()
            _rename_user(db, "bob")
            [again] = (await session.scalars(select(User))).all()
            assert again is user
            assert again.name == "alice"  # the stale value, served from the map
            await session.commit()
        await engine.dispose()
        return guard

    guard = asyncio.run(scenario())
    _only_stale_read(guard)
    stats = guard.stats()
    assert stats.statements == 2
    assert (stats.identity_map_hits, stats.verified_objects) == (1, 1)
    assert (stats.stale_reads, stats.skipped_checks) == (1, 0)


def test_async_fresh_hit_is_not_reported(db, seed):
    """An unchanged row read again from the map is verified and not reported."""
    seed(db)

    async def scenario() -> Guard:
        engine, session, guard = _guarded_session(db, "AsyncEngine")
        async with session:
            user = await session.get(User, 1)
            await session.commit()
            assert await session.get(User, 1) is user
            assert (await session.scalars(select(User))).one() is user
        await engine.dispose()
        return guard

    guard = asyncio.run(scenario())
    assert guard.findings == []
    stats = guard.stats()
    assert (stats.identity_map_hits, stats.verified_objects) == (2, 2)
    assert (stats.stale_reads, stats.verification_errors) == (0, 0)


def test_many_to_one_outside_greenlet_is_skipped(db, seed):
    """address.user in plain async code: skipped and counted, no MissingGreenlet."""
    seed(db)

    async def scenario() -> tuple[Guard, list[Any]]:
        engine = db.async_engine()
        guard = install_guard(engine)
        stages = []
        async with AsyncSession(engine, expire_on_commit=False) as session:
            user = await session.get(User, 1)
            address = await session.get(Address, 1)
            await session.commit()
            _rename_user(db, "bob")

            assert not in_greenlet()
            # A lazy='select' many-to-one answered from the identity map.
            assert address.user is user
            assert user.name == "alice"
            stages.append(guard.stats())

            # The same lookup inside the greenlet is checked, and the row was
            # stale all along.
            session.expire(address, ["user"])
            assert await session.run_sync(lambda _: address.user) is user
            stages.append(guard.stats())
        await engine.dispose()
        return guard, stages

    guard, (outside, inside) = asyncio.run(scenario())
    assert outside.skipped_checks == 1
    assert outside.identity_map_hits == 1
    assert outside.verified_objects == 0
    assert outside.stale_reads == 0
    assert outside.verification_errors == 0
    assert inside.skipped_checks == 1
    assert inside.verified_objects == 1
    assert inside.stale_reads == 1
    _only_stale_read(guard)


def test_async_finding_location_names_user_code(db, seed):
    """Under asyncio a stale read's location is the awaiting line in user code."""
    seed(db)

    async def scenario() -> tuple[Guard, list[int]]:
        engine, session, guard = _guarded_session(db, "AsyncEngine")
        lines = []
        async with session:
            user = await session.get(User, 1)  # held: the identity map is weak
            await session.commit()
            _rename_user(db, "bob")
            lines.append(sys._getframe().f_lineno + 1)
            await session.get(User, 1)
            lines.append(sys._getframe().f_lineno + 1)
            await session.scalars(select(User))
            assert user.name == "alice"
        await engine.dispose()
        return guard, lines

    guard, lines = asyncio.run(scenario())
    assert [finding.location for finding in guard.findings] == [
        f"{__file__}:{line}" for line in lines
    ]


def test_async_scalars_stale_read_raises_at_the_await(db, seed):
    """on_stale="raise": the StaleReadError reaches the await of the read, not a log line."""
    from sessionguard import StaleReadError

    seed(db)

    async def scenario() -> tuple[Guard, BaseException | None]:
        engine = db.async_engine()
        maker = async_sessionmaker(engine, expire_on_commit=False)
        async with maker() as session:
            user = await session.get(User, 1)
            await session.commit()
            _rename_user(db, "bob")
            # Without a guard: the stale value, silently.
            [again] = (await session.scalars(select(User))).all()
            assert again is user and again.name == "alice"
            guard = install_guard(engine, on_stale="raise")
            raised = None
            try:
                await session.scalars(select(User))
            except StaleReadError as error:
                raised = error
        await engine.dispose()
        return guard, raised

    guard, raised = asyncio.run(scenario())
    assert isinstance(raised, StaleReadError)
    assert raised.finding is _only_stale_read(guard)
    assert guard.stats().internal_errors == 0
