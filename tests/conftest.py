"""Shared fixtures: real SQLite, PostgreSQL and MariaDB databases, and guard clean-up."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import pytest

# Tests that use pytester put sys.modules back as it was before them. A dialect
# first imported inside such a test (by the pg_url fixture, say) would be
# imported again by the next test, and SQLAlchemy warns, an error here, that the
# PostgreSQL dialect's SQL functions are registered twice. Import them first.
import sqlalchemy.dialects.mysql
import sqlalchemy.dialects.postgresql  # noqa: F401
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from sessionguard import _guard, _stale

from ._mariadb import MariaDBUnavailable, throwaway_mariadb
from ._postgres import PostgresUnavailable, throwaway_postgres
from ._servers import private_database
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
        # A database of this worker's own: xdist workers (and other runs)
        # sharing the server would otherwise make the same tables at once.
        with private_database(configured) as url:
            yield url
        return
    try:
        with throwaway_postgres() as url:
            yield url
    except PostgresUnavailable as error:
        _unavailable(f"PostgreSQL is unavailable ({error})")


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    """A MariaDB/MySQL URL: SESSIONGUARD_TEST_MYSQL_URL, or a throwaway mariadbd."""
    configured = os.environ.get("SESSIONGUARD_TEST_MYSQL_URL")
    if configured:
        with private_database(configured) as url:
            yield url
        return
    try:
        with throwaway_mariadb() as url:
            yield url
    except MariaDBUnavailable as error:
        _unavailable(f"MariaDB is unavailable ({error})")


@dataclasses.dataclass
class Database:
    """One test database and how to reach it, synchronously and with asyncio."""

    name: str
    url: str
    async_url: str
    engines: list[Any] = dataclasses.field(default_factory=list)
    engine_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Options every engine of the test gets unless the test says otherwise."""

    def engine(self, **kwargs: Any) -> Engine:
        """A new engine on the database (disposed at the end of the test)."""
        engine = create_engine(self.url, **{**self.engine_defaults, **kwargs})
        self.engines.append(engine)
        return engine

    def async_engine(self, **kwargs: Any) -> Any:
        from sqlalchemy.ext.asyncio import create_async_engine

        options = {**self.engine_defaults, **kwargs}
        engine = create_async_engine(self.async_url, **options)
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


def mysql_system(url: str) -> str:
    """``mariadb`` or ``mysql``: what the server at *url* really is."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return (
                "mariadb"
                if getattr(connection.dialect, "is_mariadb", False)
                else "mysql"
            )
    finally:
        engine.dispose()


_systems: dict[str, str] = {}


def _mysql(url: str) -> Database:
    """MariaDB (or MySQL), READ COMMITTED unless a test asks otherwise.

    The server's default is REPEATABLE READ, where the session's snapshot is the
    truth and an outside commit is no stale read (DESIGN §1); the scenarios that
    show a stale read need READ COMMITTED, like PostgreSQL's default. Tests of
    REPEATABLE READ pass ``isolation_level`` themselves.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()  # mysql:// or mariadb://, as given
    sync = parsed.set(drivername=f"{backend}+pymysql")
    async_ = parsed.set(drivername=f"{backend}+aiomysql")
    rendered = sync.render_as_string(hide_password=False)
    if rendered not in _systems:
        _systems[rendered] = mysql_system(rendered)
    return Database(
        _systems[rendered],
        rendered,
        async_.render_as_string(hide_password=False),
        engine_defaults={"isolation_level": "READ COMMITTED"},
    )


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Database]:
    """Each test database in turn, with the test models' tables created empty."""
    if request.param == "sqlite":
        database = _sqlite(tmp_path)
    elif request.param == "postgresql":
        database = _postgres(request.getfixturevalue("pg_url"))
    else:
        database = _mysql(request.getfixturevalue("mysql_url"))
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
