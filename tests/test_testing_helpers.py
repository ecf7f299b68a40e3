"""sessionguard.testing: capture(), assert_no_stale_reads() and the schema checks."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, update
from sqlalchemy.orm import Session

from sessionguard import SessionGuardError, StaleRead, _guard, install_guard
from sessionguard.testing import (
    assert_migrations_current,
    assert_no_stale_reads,
    assert_schema_ready,
    capture,
)

from .models import Base, User

_names = itertools.count(1)


def _read_stale(database):
    """One stale read of User 1 through a session on a fresh engine."""
    engine, writer = database.engine(), database.engine()
    session = Session(engine, expire_on_commit=False)
    user = session.get(User, 1)
    session.commit()
    with Session(writer) as other:
        other.execute(update(User).values(name=f"bob-{next(_names)}"))
        other.commit()
    session.get(User, 1)
    session.close()
    return user


def test_capture_installs_a_temporary_guard_when_none_is(sqlite_db, seed):
    """With no guard installed, capture() watches the block and leaves nothing behind."""
    seed(sqlite_db)
    with capture() as findings:
        assert len(_guard._installed) == 1
        _read_stale(sqlite_db)
    [finding] = findings
    assert isinstance(finding, StaleRead)
    assert (finding.entity, finding.identity) == ("User", (1,))
    assert len(_guard._installed) == 0


def test_capture_uses_installed_guards_and_only_its_block(sqlite_db, seed):
    """capture() sees an installed guard's findings made in its block, not before or after."""
    seed(sqlite_db)
    guard = install_guard(None)
    _read_stale(sqlite_db)
    with capture() as findings:
        _read_stale(sqlite_db)
    _read_stale(sqlite_db)
    assert len(findings) == 1
    assert len([f for f in guard.findings if isinstance(f, StaleRead)]) == 3
    assert guard.installed
    assert guard._finding_callbacks == []


def test_assert_no_stale_reads_lists_them(sqlite_db, seed):
    """assert_no_stale_reads() raises an AssertionError describing each stale read."""
    seed(sqlite_db)
    guard = install_guard(None)
    assert_no_stale_reads(guard)
    _read_stale(sqlite_db)
    with pytest.raises(
        AssertionError, match=r"1 stale read\(s\):\n- stale read of User"
    ):
        assert_no_stale_reads(guard)
    with pytest.raises(AssertionError, match="stale read of User 1 at"):
        assert_no_stale_reads()  # the installed guard


def test_assert_no_stale_reads_without_any_guard_is_an_error():
    """With no guard given or installed there is nothing to check: SessionGuardError."""
    with pytest.raises(SessionGuardError, match="no installed guard"):
        assert_no_stale_reads()


def test_assert_schema_ready_names_missing_tables_and_columns(sqlite_db):
    """assert_schema_ready() names each missing table and column, and passes when all exist."""
    engine = sqlite_db.engine()
    assert_schema_ready(engine, Base.metadata)
    wanted = MetaData()
    Table("sg_users", wanted, Column("id", Integer, primary_key=True),
          Column("nickname", String(20)))  # fmt: skip
    Table("sg_orders", wanted, Column("id", Integer, primary_key=True))
    with pytest.raises(AssertionError) as info:
        assert_schema_ready(engine, wanted)
    message = str(info.value)
    assert "missing tables: sg_orders" in message
    assert "missing columns: sg_users.nickname" in message


def test_testing_module_does_not_import_pytest():
    """Importing sessionguard.testing does not import pytest."""
    code = "import sys, sessionguard.testing; print('pytest' in sys.modules)"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert output.stdout.strip() == "False"


@pytest.fixture
def alembic_config(tmp_path, sqlite_db):
    """An alembic environment with one revision, pointed at the SQLite test database."""
    pytest.importorskip(
        "alembic",
        reason="!!! SKIPPED, NOT TESTED: alembic (the 'alembic' extra) is not installed",
    )
    from alembic import command
    from alembic.config import Config

    migrations = str(tmp_path / "migrations")
    command.init(
        Config(str(tmp_path / "alembic.ini"), stdout=io.StringIO()), migrations
    )
    # No config file: env.py then leaves the process's logging configuration alone.
    config = Config(stdout=io.StringIO())
    config.set_main_option("script_location", migrations)
    config.set_main_option("sqlalchemy.url", sqlite_db.url)
    script = command.revision(config, "first")
    return config, script.revision


def test_assert_migrations_current_says_where_the_database_is(
    sqlite_db, alembic_config
):
    """assert_migrations_current() names the database's revision and the head until stamped."""
    from alembic import command

    config, head = alembic_config
    engine = create_engine(sqlite_db.url)
    with pytest.raises(
        AssertionError, match=f"is at revision no revision.*head is {head}"
    ):
        assert_migrations_current(engine, config)
    command.stamp(config, "head")
    assert_migrations_current(engine, config)
    engine.dispose()
