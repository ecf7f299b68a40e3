"""A finding's location is the user's own line, also through wrapper libraries."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest
from sqlalchemy import create_engine, update

from sessionguard import StaleRead, cli, install_guard
from sessionguard._location import is_user_file

sqlmodel = pytest.importorskip("sqlmodel")

HERE = Path(__file__).read_text().splitlines()


def _line(marker: str) -> str:
    """``this file:line`` of the line ending with ``# <marker>``."""
    numbers = [n for n, text in enumerate(HERE, 1) if text.endswith(f"# {marker}")]
    assert len(numbers) == 1, marker
    return f"{__file__}:{numbers[0]}"


class Hero(sqlmodel.SQLModel, table=True):
    __tablename__ = "sg_location_heroes"

    id: int | None = sqlmodel.Field(default=None, primary_key=True)
    name: str


@pytest.fixture
def heroes(tmp_path):
    """A SQLite file with one hero, a guarded engine and a writer engine."""
    url = f"sqlite:///{tmp_path / 'heroes.sqlite'}"
    engine, writer = create_engine(url), create_engine(url)
    sqlmodel.SQLModel.metadata.create_all(engine, tables=[Hero.__table__])
    with sqlmodel.Session(engine) as session:
        session.add(Hero(id=1, name="Deadpond"))
        session.commit()
    yield engine, writer
    engine.dispose()
    writer.dispose()


def _rename(writer) -> None:
    with writer.begin() as connection:
        connection.execute(update(Hero).values(name="Rusty-Man"))


def test_sqlmodel_exec_execute_and_get_point_at_the_callers_line(heroes):
    """SQLModel's Session.exec(), .execute() and .get() report the test's line, not sqlmodel's."""
    engine, writer = heroes
    guard = install_guard(engine)
    with sqlmodel.Session(engine, expire_on_commit=False) as session:
        hero = session.get(Hero, 1)  # kept alive: the map holds it weakly
        session.commit()
        _rename(writer)
        statement = sqlmodel.select(Hero).where(Hero.id == 1)
        session.exec(statement).one()  # exec
        session.execute(statement).scalar_one()  # execute
        session.get(Hero, 1)  # get
        assert hero is not None
    stale = [f for f in guard.findings if isinstance(f, StaleRead)]
    assert [f.location for f in stale] == [
        _line("exec"),
        _line("execute"),
        _line("get"),
    ]


def test_sqlmodel_async_session_exec_points_at_the_awaiting_line(tmp_path):
    """SQLModel's AsyncSession.exec() reports the line that awaited it."""
    pytest.importorskip("aiosqlite")
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlmodel.ext.asyncio.session import AsyncSession

    path = tmp_path / "async.sqlite"
    sync = create_engine(f"sqlite:///{path}")
    sqlmodel.SQLModel.metadata.create_all(sync, tables=[Hero.__table__])
    with sqlmodel.Session(sync) as session:
        session.add(Hero(id=1, name="Deadpond"))
        session.commit()

    async def scenario() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        guard = install_guard(engine)
        async with AsyncSession(engine, expire_on_commit=False) as session:
            hero = await session.get(Hero, 1)
            await session.commit()
            _rename(sync)
            statement = sqlmodel.select(Hero).where(Hero.id == 1)
            (await session.exec(statement)).one()  # async exec
            assert hero is not None
        await engine.dispose()
        assert [f.location for f in guard.findings] == [_line("async exec")]

    asyncio.run(scenario())
    sync.dispose()


def test_flask_sqlalchemy_reads_point_at_the_callers_line(tmp_path):
    """Flask-SQLAlchemy's db.session, db.get_or_404() and Model.query report the caller's line."""
    flask = pytest.importorskip("flask")
    flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")
    url = f"sqlite:///{tmp_path / 'flask.sqlite'}"
    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    db = flask_sqlalchemy.SQLAlchemy(app, session_options={"expire_on_commit": False})

    class Villain(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "sg_location_villains"
        id = db.Column(db.Integer, primary_key=True)
        name = db.Column(db.String(50))

    writer = create_engine(url)
    with app.app_context():
        db.create_all()
        db.session.add(Villain(id=1, name="Gru"))
        db.session.commit()
        guard = install_guard(db.engine)
        villain = db.session.get(Villain, 1)
        db.session.commit()
        with writer.begin() as connection:
            connection.execute(update(Villain).values(name="Vector"))
        db.session.execute(db.select(Villain)).scalar_one()  # flask execute
        db.session.get(Villain, 1)  # flask get
        db.get_or_404(Villain, 1)  # flask get_or_404
        with pytest.warns(DeprecationWarning, match="legacy"):
            Villain.query.get_or_404(1)  # flask query
        db.one_or_404(db.select(Villain).filter_by(id=1))  # flask one_or_404
        assert villain is not None
        locations = [f.location for f in guard.findings]
        db.session.remove()
    writer.dispose()
    assert locations == [
        _line("flask execute"),
        _line("flask get"),
        _line("flask get_or_404"),
        _line("flask query"),
        _line("flask one_or_404"),
    ]


def test_installed_and_standard_library_files_are_not_user_code():
    """site-packages, dist-packages, purelib/platlib and the stdlib are skipped; this file is not."""
    purelib = sysconfig.get_paths()["purelib"]
    assert not is_user_file(os.path.join(purelib, "sqlmodel", "orm", "session.py"))
    assert not is_user_file("/usr/lib/python3/dist-packages/flask_sqlalchemy/x.py")
    assert not is_user_file(os.__file__)
    assert not is_user_file(sysconfig.__file__)
    assert not is_user_file("<frozen runpy>")
    assert not is_user_file("<sqlalchemy generated warned() wrapper for Query.get>")
    assert is_user_file(__file__)
    assert is_user_file("<string>")
    # Installed editable here: sessionguard's public modules are where its
    # demo reads, and count as user code.
    assert is_user_file(cli.__file__)


def test_fallback_is_the_first_frame_outside_sqlalchemy_when_all_is_installed(
    heroes, monkeypatch
):
    """With every frame third-party (this file counted as installed), the first non-SQLAlchemy frame is named."""
    from sessionguard import _location

    engine, writer = heroes
    monkeypatch.setattr(_location, "_user_files", {})
    monkeypatch.setattr(_location, "_is_user_file", lambda filename: False)
    guard = install_guard(engine)
    with sqlmodel.Session(engine, expire_on_commit=False) as session:
        hero = session.get(Hero, 1)
        session.commit()
        _rename(writer)
        result = session.exec(sqlmodel.select(Hero))  # builds the result
        line = sys._getframe().f_lineno + 1
        assert result.one() is hero  # fetches the rows: the read
    (finding,) = guard.findings
    # Every frame counts as installed code; the first one outside SQLAlchemy
    # and sessionguard is where the rows were fetched.
    assert finding.location == f"{__file__}:{line}"
