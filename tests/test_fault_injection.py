"""A verification query that fails never changes the outcome of the user's work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import Column, Integer, String, Table, TypeDecorator, exc, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from structlog.testing import capture_logs

from sessionguard import install_guard

from .conftest import Database

if TYPE_CHECKING:
    from collections.abc import Iterator


class FaultBase(DeclarativeBase):
    pass


class Quotient(FaultBase):
    """Mapped to a view whose ``quotient`` is ``10 / divisor``."""

    __table__ = Table(
        "sg_fault_quotients",
        FaultBase.metadata,
        Column("id", Integer, primary_key=True),
        Column("quotient", Integer),
        Column("label", String(20)),
    )


class Journal(FaultBase):
    """Where the user's own transaction writes."""

    __tablename__ = "sg_fault_journal"

    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(String(50))


class Fussy(TypeDecorator[str]):
    """A string type whose result processing fails for one value."""

    impl = String(20)
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if value == "unreadable":
            raise ValueError("Fussy cannot read 'unreadable'")
        return value


class Labelled(FaultBase):
    __tablename__ = "sg_fault_labelled"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(Fussy())


_QUOTIENTS = Quotient.__table__
_VIEW_SQL = (
    "CREATE VIEW sg_fault_quotients AS "
    "SELECT id, 10 / divisor AS quotient, label FROM sg_fault_divisors"
)
_CHECK_SQL = text("SELECT id, quotient, label FROM sg_fault_quotients WHERE id IN (1)")


@pytest.fixture
def pg_view(pg_url: str) -> Iterator[str]:
    """PostgreSQL with the divisor table, the quotient view and the journal table."""
    url = make_url(pg_url).set(drivername="postgresql+psycopg")
    rendered = url.render_as_string(hide_password=False)
    database = Database("postgresql", rendered, rendered)
    setup = database.engine()
    with setup.begin() as connection:
        connection.execute(text("DROP VIEW IF EXISTS sg_fault_quotients"))
        connection.execute(text("DROP TABLE IF EXISTS sg_fault_divisors"))
        connection.execute(
            text(
                "CREATE TABLE sg_fault_divisors "
                "(id integer PRIMARY KEY, divisor integer NOT NULL, label text)"
            )
        )
        connection.execute(text(_VIEW_SQL))
        connection.execute(
            text(
                "INSERT INTO sg_fault_divisors (id, divisor, label) "
                "VALUES (1, 2, 'one'), (2, 5, 'two')"
            )
        )
        Journal.__table__.drop(connection, checkfirst=True)
        Journal.__table__.create(connection)
    yield rendered
    with setup.begin() as connection:
        connection.execute(text("DROP VIEW IF EXISTS sg_fault_quotients"))
        connection.execute(text("DROP TABLE IF EXISTS sg_fault_divisors"))
        Journal.__table__.drop(connection, checkfirst=True)
    for engine in database.engines:
        engine.dispose()


def _journal_notes(url: str) -> list[str]:
    """The journal as a separate connection sees it (committed rows only)."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return list(
                connection.scalars(
                    text("SELECT note FROM sg_fault_journal ORDER BY id")
                )
            )
    finally:
        engine.dispose()


@pytest.mark.parametrize("on_stale", ["log", "raise"])
def test_server_side_check_failure_keeps_transaction(pg_view, on_stale):
    """A check SELECT that fails on the server is a verification_error; work commits."""
    from sqlalchemy import create_engine

    engine, writer = create_engine(pg_view), create_engine(pg_view)
    try:
        session = Session(engine, expire_on_commit=False)
        quotient = session.get(Quotient, 1)
        assert quotient.quotient == 5
        session.commit()
        with writer.begin() as connection:
            connection.execute(
                text("UPDATE sg_fault_divisors SET divisor = 0 WHERE id = 1")
            )

        with capture_logs() as logs:
            guard = install_guard(engine, on_stale=on_stale)
            session.add(Journal(id=1, note="mine"))
            session.flush()
            assert session.get(Quotient, 1) is quotient  # the read still returns
            assert quotient.quotient == 5
            # The transaction is alive: the next statement and the commit work.
            assert session.scalars(select(Journal.note)).all() == ["mine"]
            session.commit()
        session.close()

        assert _journal_notes(pg_view) == ["mine"]
        stats = guard.stats()
        assert stats.verification_errors == 1
        assert stats.stale_reads == 0
        assert guard.findings == []
        [error] = [entry for entry in logs if entry["event"] == "verification_error"]
        assert error["log_level"] == "error"
        assert error["entity"] == "Quotient"
        assert (
            "DivisionByZero" in error["error"] or "division by zero" in error["error"]
        )
    finally:
        engine.dispose()
        writer.dispose()


def test_failed_select_aborts_postgresql_transaction_without_savepoint(pg_view):
    """Why the SAVEPOINT matters: the same failing SELECT poisons a bare transaction."""
    import psycopg.errors
    from sqlalchemy import create_engine

    engine = create_engine(pg_view)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE sg_fault_divisors SET divisor = 0 WHERE id = 1")
            )

        with engine.connect() as connection:
            connection.execute(
                text("INSERT INTO sg_fault_journal (id, note) VALUES (1, 'mine')")
            )
            with pytest.raises(exc.DataError) as failed:
                connection.execute(_CHECK_SQL)
            assert isinstance(failed.value.orig, psycopg.errors.DivisionByZero)
            with pytest.raises(exc.InternalError) as aborted:
                connection.execute(text("SELECT 1"))
            assert isinstance(aborted.value.orig, psycopg.errors.InFailedSqlTransaction)
            connection.rollback()
        assert _journal_notes(pg_view) == []

        # The same statement inside a SAVEPOINT leaves the transaction usable.
        with engine.connect() as connection:
            connection.execute(
                text("INSERT INTO sg_fault_journal (id, note) VALUES (1, 'mine')")
            )
            savepoint = connection.begin_nested()
            with pytest.raises(exc.DataError):
                connection.execute(_CHECK_SQL)
            savepoint.rollback()
            assert connection.scalar(text("SELECT 1")) == 1
            connection.commit()
        assert _journal_notes(pg_view) == ["mine"]
    finally:
        engine.dispose()


@pytest.fixture
def labelled(db: Database) -> Iterator[Database]:
    """The test database with the Fussy-typed table and the journal table."""
    engine = db.engine()
    tables = [Labelled.__table__, Journal.__table__]
    FaultBase.metadata.drop_all(engine, tables=tables)
    FaultBase.metadata.create_all(engine, tables=tables)
    yield db
    FaultBase.metadata.drop_all(engine, tables=tables)


def test_result_processing_failure_is_verification_error(labelled):
    """A TypeDecorator raising on the current value: verification_error, read intact."""
    engine, writer = labelled.engine(), labelled.engine()
    with writer.begin() as connection:
        connection.execute(
            text("INSERT INTO sg_fault_labelled (id, label) VALUES (1, 'fine')")
        )
    session = Session(engine, expire_on_commit=False)
    row = session.get(Labelled, 1)
    session.commit()
    # Before the session writes: on SQLite its flush will hold the write lock.
    with writer.begin() as connection:
        connection.execute(
            text("UPDATE sg_fault_labelled SET label = 'unreadable' WHERE id = 1")
        )

    with capture_logs() as logs:
        guard = install_guard(engine, on_stale="raise")
        session.add(Journal(id=1, note="mine"))
        session.flush()
        assert session.get(Labelled, 1) is row
        assert row.label == "fine"
        assert session.scalars(select(Journal.note)).all() == ["mine"]
        session.commit()
    session.close()

    with writer.connect() as connection:
        notes = connection.scalars(text("SELECT note FROM sg_fault_journal")).all()
    assert notes == ["mine"]
    assert guard.stats().verification_errors == 1
    assert guard.stats().stale_reads == 0
    [error] = [entry for entry in logs if entry["event"] == "verification_error"]
    assert error["log_level"] == "error"
    assert error["entity"] == "Labelled"
    assert "ValueError: Fussy cannot read 'unreadable'" in error["error"]
