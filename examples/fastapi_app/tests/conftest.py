"""
The test-suite pattern behind the classic bug.

``session`` is ONE session for the whole test, and ``client`` makes the app use
it for every request instead of a fresh session each time. Objects loaded or
created through it stay in its identity map, and with ``expire_on_commit=False``
nothing ever refreshes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from app import app, get_session
from fastapi.testclient import TestClient
from models import Base, User
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def engine(tmp_path) -> Iterator[Engine]:
    """A fresh SQLite file database with the schema."""
    engine = create_engine(f"sqlite:///{tmp_path / 'test.sqlite'}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """One session shared by the test and every request it makes (the bug)."""
    with Session(engine, expire_on_commit=False) as session:
        yield session


@pytest.fixture
def client(session: Session) -> Iterator[TestClient]:
    """The app, with get_session overridden to hand out the shared session."""
    app.dependency_overrides[get_session] = lambda: session
    with TestClient(app) as client:
        yield client
    app.dependency_overrides.clear()


@pytest.fixture
def alice(session: Session) -> User:
    """A user created through the shared session, held by the test."""
    user = User(name="alice", email="alice@example.com")
    session.add(user)
    session.commit()
    return user


@pytest.fixture
def support_tool(engine: Engine) -> Iterator[Engine]:
    """Another connection to the same database: an admin script, a worker."""
    other = create_engine(engine.url)
    yield other
    other.dispose()
