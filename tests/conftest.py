"""Shared fixtures: real SQLite and PostgreSQL databases, and guard clean-up."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from sessionguard import _guard, _stale

from ._postgres import PostgresUnavailable, throwaway_postgres
from .models import Address, Base, User

IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and {reason}: a missing service is a failure in CI")
    pytest.skip(f"!!! SKIPPED, NOT TESTED: {reason}")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL: SESSIONGUARD_TEST_PG_URL, or a throwaway cluster."""
    configured = os.environ.get("SESSIONGUARD_TEST_PG_URL")
    if configured:
        yield configured
        return
    try:
        with throwaway_postgres() as url:
            yield url
    except PostgresUnavailable as error:
        _unavailable(f"PostgreSQL is unavailable ({error})")


@dataclasses.dataclass
class Database:
    """One test database and how to reach it, synchronously and with asyncio."""

    name: str
    url: str
    async_url: str
    engines: list[Any] = dataclasses.field(default_factory=list)

    def engine(self, **kwargs: Any) -> Engine:
        """A new engine on the database (disposed at the end of the test)."""
        engine = create_engine(self.url, **kwargs)
        self.engines.append(engine)
        return engine

    def async_engine(self, **kwargs: Any) -> Any:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(self.async_url, **kwargs)
        self.engines.append(engine)
        return engine


def _sqlite(tmp_path: Any) -> Database:
    path = tmp_path / "sessionguard.sqlite"
    return Database("sqlite", f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}")


def _postgres(url: str) -> Database:
    parsed = make_url(url)
    sync = parsed.set(drivername="postgresql+psycopg")
    async_ = parsed.set(drivername="postgresql+asyncpg")
    return Database(
        "postgresql",
        sync.render_as_string(hide_password=False),
        async_.render_as_string(hide_password=False),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Database]:
    """Each test database in turn, with the test models' tables created empty."""
    if request.param == "sqlite":
        database = _sqlite(tmp_path)
    else:
        database = _postgres(request.getfixturevalue("pg_url"))
    setup = create_engine(database.url)
    Base.metadata.drop_all(setup)
    Base.metadata.create_all(setup)
    setup.dispose()
    yield database
    for engine in database.engines:
        sync = getattr(engine, "sync_engine", engine)
        sync.dispose()
    cleanup = create_engine(database.url)
    Base.metadata.drop_all(cleanup)
    cleanup.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Any) -> Iterator[Database]:
    """Only SQLite: for behaviour that does not depend on the backend."""
    database = _sqlite(tmp_path)
    setup = create_engine(database.url)
    Base.metadata.create_all(setup)
    setup.dispose()
    yield database
    for engine in database.engines:
        getattr(engine, "sync_engine", engine).dispose()


@pytest.fixture
def seed() -> Any:
    """Insert one user with one address through a fresh engine."""

    def insert(database: Database, **values: Any) -> None:
        from sqlalchemy.orm import Session

        engine = create_engine(database.url)
        with Session(engine) as session:
            user = User(id=1, name="alice", **values)
            user.addresses.append(Address(id=1, street="1 Main St"))
            session.add(user)
            session.commit()
        engine.dispose()

    return insert


@pytest.fixture(autouse=True)
def _uninstall_guards(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every guard a test installed is uninstalled, and no hook is left behind."""
    from sessionguard import pytest_plugin

    yield
    plugin_state = pytest_plugin._state(request.config)
    plugin_guard = plugin_state.guard if plugin_state is not None else None
    for guard in list(_guard._live):
        if guard is not plugin_guard:
            guard.uninstall()
    if plugin_guard is None:
        assert _stale._hooks.users == 0, "a guard left the process-wide hooks installed"
