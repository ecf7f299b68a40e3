"""
The usual shared-session setup, and the trap in it.

``client`` is session-scoped: one TestClient, so one event loop (its portal
thread) for the whole run, which asyncpg connections require. ``session`` is
ONE AsyncSession per test, handed to every request through a dependency
override, with ``expire_on_commit=False`` so objects stay usable in the test.
Whatever it loaded stays in its identity map for the whole test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from app import Hero, Team, app, engine, get_session
from fastapi.testclient import TestClient
from sqlalchemy import text, update
from sqlmodel.ext.asyncio.session import AsyncSession

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


@pytest.fixture(scope="session")
def client() -> Iterator[TestClient]:
    with TestClient(app) as client:  # runs the lifespan: creates the tables
        yield client


@pytest.fixture
def session(client: TestClient) -> Iterator[AsyncSession]:
    """One session for the test and every request it makes."""

    async def make() -> AsyncSession:
        return AsyncSession(engine, expire_on_commit=False)

    session = client.portal.call(make)

    async def shared() -> AsyncSession:
        return session

    app.dependency_overrides[get_session] = shared
    yield session
    app.dependency_overrides.clear()
    client.portal.call(session.close)

    async def truncate() -> None:
        async with engine.begin() as connection:
            await connection.execute(
                text("TRUNCATE hero, team RESTART IDENTITY CASCADE")
            )

    client.portal.call(truncate)


@pytest.fixture
def db(client: TestClient, session: AsyncSession) -> Callable[..., Any]:
    """Run ``fn(sync_session)`` on the shared session, on the app's event loop."""

    def run(fn: Callable[..., Any]) -> Any:
        return client.portal.call(session.run_sync, fn)

    return run


@pytest.fixture
def make_hero(client: TestClient, session: AsyncSession) -> Callable[..., dict]:
    def make(name: str = "Deadpond", secret_name: str = "Dive Wilson", **extra):
        response = client.post(
            "/heroes/", json={"name": name, "secret_name": secret_name, **extra}
        )
        assert response.status_code == 201, response.text
        return response.json()

    return make


@pytest.fixture
def make_team(client: TestClient, session: AsyncSession) -> Callable[..., dict]:
    def make(name: str = "Preventers", headquarters: str = "Sharp Tower"):
        response = client.post(
            "/teams/", json={"name": name, "headquarters": headquarters}
        )
        assert response.status_code == 201, response.text
        return response.json()

    return make


@pytest.fixture
def hero(db, session) -> Hero:
    """A hero created through the shared session, held by the test."""

    def create(sync_session) -> Hero:
        hero = Hero(name="Spider-Boy", secret_name="Pedro Parqueador", age=16)
        sync_session.add(hero)
        sync_session.commit()
        return hero

    return db(create)


@pytest.fixture
def team(db, session) -> Team:
    def create(sync_session) -> Team:
        team = Team(name="Z-Force", headquarters="Sister Margaret's Bar")
        sync_session.add(team)
        sync_session.commit()
        return team

    return db(create)


@pytest.fixture
def support_tool(client: TestClient) -> Callable[..., None]:
    """Another connection to the database: an admin script, a background job."""

    def rename(hero_id: int, name: str) -> None:
        async def write() -> None:
            async with engine.begin() as connection:
                await connection.execute(
                    update(Hero).where(Hero.id == hero_id).values(name=name)
                )

        client.portal.call(write)

    return rename
