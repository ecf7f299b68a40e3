"""sessionguard doctor: one-line errors, and every visibility sentence observed.

Each sentence doctor prints about what a session sees is checked here the same
way: read the settings doctor reports for an engine or URL, then make two
connections and watch it happen.
"""

from __future__ import annotations

import io
import json
import socket
import sqlite3
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.engine import make_url

from sessionguard._doctor import read_settings
from sessionguard.cli import main

# -- helpers ---------------------------------------------------------------------------


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(["doctor", *argv], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sessionguard doctor: ")
    assert "Traceback" not in err
    return lines[0]


def _settings(target: Any) -> dict[str, Any]:
    return {setting.name: setting for setting in read_settings(target)}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _sqlite_file(tmp_path: Any, name: str = "app.sqlite", *, wal: bool = False) -> Any:
    path = tmp_path / name
    connection = sqlite3.connect(path)
    if wal:
        connection.execute("PRAGMA journal_mode=wal")
    connection.execute("CREATE TABLE sg_doctor (id INTEGER PRIMARY KEY, v TEXT)")
    connection.execute("INSERT INTO sg_doctor VALUES (1, 'old')")
    connection.commit()
    connection.close()
    return path


def _set(engine: Any, value: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE sg_doctor SET v = :v WHERE id = 1"), {"v": value}
        )


def _value(connection: Any) -> str:
    return str(
        connection.execute(text("SELECT v FROM sg_doctor WHERE id = 1")).scalar_one()
    )


def _begin_recipe(engine: Any) -> Any:
    """SQLAlchemy's documented pysqlite recipe: SQLAlchemy emits BEGIN itself."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


# -- errors: one line on stderr, status 2 ----------------------------------------------


def test_not_a_url():
    """'notaurl' is one line saying what a URL looks like."""
    status, out, err = _run("notaurl")
    line = _one_error_line(err)
    assert status == 2 and out == ""
    assert "'notaurl' is not a database URL" in line
    assert "postgresql+psycopg://" in line


def test_unknown_dialect():
    """nosuchdb://x names the dialect and suggests real ones."""
    status, _, err = _run("nosuchdb://x")
    line = _one_error_line(err)
    assert status == 2
    assert "nosuchdb://x: SQLAlchemy has no dialect or driver 'nosuchdb'" in line


def test_missing_driver_names_the_pip_package_and_masks_the_password(monkeypatch):
    """A driver that is not installed: the pip package to install; no password shown."""
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # import psycopg2 fails
    status, _, err = _run("postgresql+psycopg2://app:s3cret@localhost/app")
    line = _one_error_line(err)
    assert status == 2
    assert "s3cret" not in line
    assert "postgresql+psycopg2://app:***@localhost/app" in line
    assert "pip install 'psycopg2-binary'" in line


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://app:s3cret@127.0.0.1:{port}/app",
        "mysql+pymysql://app:s3cret@127.0.0.1:{port}/app",
        "postgresql+asyncpg://app:s3cret@127.0.0.1:{port}/app",
    ],
)
def test_refused_connection(url):
    """Nobody listening: one line that says so and where."""
    port = _closed_port()
    status, _, err = _run(url.format(port=port))
    line = _one_error_line(err)
    assert status == 2
    assert "s3cret" not in line
    assert "cannot reach the server" in line
    assert f"is the server running and listening at 127.0.0.1:{port}?" in line


def test_rejected_role_postgresql(pg_url):
    """A role the server does not know: the login was rejected, check the user."""
    url = make_url(pg_url).set(username="no_such_role", password="s3cret")
    status, _, err = _run(url.render_as_string(hide_password=False))
    line = _one_error_line(err)
    assert status == 2
    assert "s3cret" not in line
    assert "the server rejected the login" in line
    assert "no_such_role" in line
    assert "check the user name and password" in line


def test_rejected_user_mariadb(mysql_url):
    """A user MariaDB does not know: the login was rejected, check the user."""
    url = make_url(mysql_url).set(username="no_such_user", password="s3cret")
    status, _, err = _run(url.render_as_string(hide_password=False))
    line = _one_error_line(err)
    assert status == 2
    assert "s3cret" not in line
    assert "the server rejected the login: Access denied" in line


def test_missing_sqlite_file_is_an_error_and_is_not_created(tmp_path):
    """A path with no file: status 2, and still no file afterwards."""
    path = tmp_path / "x.db"
    status, _, err = _run(f"sqlite:///{path}")
    line = _one_error_line(err)
    assert status == 2
    assert f"no SQLite database file at {path}" in line
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_one_bad_url_among_several_is_status_2(tmp_path):
    """A good URL and a bad one: the bad one's line, status 2."""
    good = _sqlite_file(tmp_path)
    status, out, err = _run(f"sqlite:///{good}", "notaurl")
    assert status == 2 and out == ""
    assert "'notaurl'" in _one_error_line(err)


def test_console_script_error_is_one_line_without_traceback():
    """The installed command itself: one stderr line, exit status 2."""
    done = subprocess.run(
        [sys.executable, "-m", "sessionguard.cli", "doctor", "nosuchdb://x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    _one_error_line(done.stderr)


def test_help_documents_the_exit_statuses(capsys):
    """doctor --help says what 0, 1 and 2 mean."""
    with pytest.raises(SystemExit) as exited:
        main(["doctor", "--help"])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert "exit status:" in printed
    for status in ("0 ", "1 ", "2 "):
        assert f"\n  {status}" in printed
    assert "listed, not counted" in printed


# -- SQLite: read-only, and what a session sees ----------------------------------------


@pytest.mark.parametrize("wal", [False, True])
def test_sqlite_is_read_without_creating_or_changing_anything(tmp_path, wal):
    """doctor leaves the directory exactly as it was (no -wal, -shm or -journal)."""
    path = _sqlite_file(tmp_path, wal=wal)
    before = {
        p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()
    }
    status, out, _ = _run(f"sqlite:///{path}")
    assert status == 0
    assert f"journal_mode                  {'wal' if wal else 'delete'}" in out
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    assert after == before


def test_sqlite_legacy_transaction_control(tmp_path):
    """Legacy control: BEGIN only before the first write; reads run outside it."""
    path = _sqlite_file(tmp_path)
    url = f"sqlite:///{path}"
    settings = _settings(url)
    control = settings["transaction control"]
    assert control.value == "legacy (BEGIN before the first write)"
    assert (
        "sends BEGIN only before the first INSERT, UPDATE or DELETE" in control.meaning
    )
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            dbapi = connection.connection.dbapi_connection
            _value(connection)
            assert connection.in_transaction()  # SQLAlchemy thinks so ...
            assert dbapi.in_transaction is False  # ... the database does not
            connection.execute(text("UPDATE sg_doctor SET v = 'mine' WHERE id = 1"))
            assert dbapi.in_transaction is True
            connection.rollback()
    finally:
        engine.dispose()


def test_sqlite_legacy_session_sees_commits_until_its_first_write(tmp_path):
    """'until its first write, each statement sees what other connections committed
    before it; from its first write until it ends, other connections cannot write'."""
    path = _sqlite_file(tmp_path)
    url = f"sqlite:///{path}"
    visibility = _settings(url)["visibility"]
    assert visibility.value == "per statement"
    assert visibility.meaning.startswith(
        "until its first write, each statement sees what other connections "
        "committed before it; from its first write until it ends, other "
        "connections cannot write ('database is locked')"
    )
    session_engine = create_engine(url)
    writer = create_engine(url, connect_args={"timeout": 0.1})
    try:
        with session_engine.connect() as session:
            assert _value(session) == "old"
            _set(writer, "new")
            assert _value(session) == "new"  # inside one SQLAlchemy transaction
            session.execute(text("UPDATE sg_doctor SET v = 'mine' WHERE id = 1"))
            with pytest.raises(exc.OperationalError, match="database is locked"):
                _set(writer, "blocked")
            session.commit()
        _set(writer, "after")  # once the session ended
    finally:
        session_engine.dispose()
        writer.dispose()


@pytest.mark.parametrize("wal", [False, True])
def test_sqlite_begin_recipe_is_seen_on_the_engine(tmp_path, wal):
    """An engine that emits BEGIN: the transaction begins with the first statement."""
    path = _sqlite_file(tmp_path, wal=wal)
    engine = _begin_recipe(create_engine(f"sqlite:///{path}"))
    try:
        settings = _settings(engine)
        control = settings["transaction control"]
        assert control.value == "BEGIN at the first statement"
        assert control.meaning == (
            "a transaction begins with the session's first statement"
        )
        with engine.connect() as connection:
            _value(connection)
            assert connection.connection.dbapi_connection.in_transaction is True
            connection.rollback()
        assert settings["journal_mode"].affects_visibility is True
    finally:
        engine.dispose()


def test_sqlite_wal_with_begin_keeps_one_snapshot(tmp_path):
    """WAL + BEGIN: 'the transaction reads one snapshot, taken at its first read:
    other connections' commits stay invisible until it ends'; the journal line:
    'a connection reading in a transaction keeps its snapshot while another
    connection commits'."""
    path = _sqlite_file(tmp_path, wal=True)
    engine = _begin_recipe(create_engine(f"sqlite:///{path}"))
    writer = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
    try:
        settings = _settings(engine)
        assert settings["visibility"].value == "snapshot"
        assert settings["visibility"].meaning == (
            "the transaction reads one snapshot, taken at its first read: other "
            "connections' commits stay invisible until it ends"
        )
        assert settings["journal_mode"].meaning == (
            "write-ahead log: a connection reading in a transaction keeps its "
            "snapshot while another connection commits"
        )
        with engine.connect() as session:
            _set(writer, "before first read")
            assert _value(session) == "before first read"
            _set(writer, "new")  # the commit succeeds ...
            assert _value(session) == "before first read"  # ... and is invisible
            session.rollback()
            assert _value(session) == "new"
            session.rollback()
    finally:
        engine.dispose()
        writer.dispose()


def test_sqlite_rollback_journal_with_begin_locks_out_writers(tmp_path):
    """Rollback journal + BEGIN: 'after its first read, other connections cannot
    commit until it ends (they wait, then fail with 'database is locked'), so its
    reads do not change'."""
    path = _sqlite_file(tmp_path)
    engine = _begin_recipe(create_engine(f"sqlite:///{path}"))
    writer = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
    try:
        settings = _settings(engine)
        assert settings["visibility"].value == "locked reads"
        assert "other connections cannot commit until it ends" in (
            settings["visibility"].meaning
        )
        assert settings["journal_mode"].meaning == (
            "rollback journal: another connection cannot commit while a "
            "transaction that has read is open"
        )
        with engine.connect() as session:
            assert _value(session) == "old"
            with pytest.raises(exc.OperationalError, match="database is locked"):
                _set(writer, "new")
            assert _value(session) == "old"
            session.rollback()
        _set(writer, "new")
    finally:
        engine.dispose()
        writer.dispose()


def test_sqlite_autocommit_engine(tmp_path):
    """AUTOCOMMIT: 'every statement commits on its own, and a rollback undoes
    nothing'; each statement sees what others committed."""
    path = _sqlite_file(tmp_path)
    engine = create_engine(f"sqlite:///{path}", isolation_level="AUTOCOMMIT")
    other = create_engine(f"sqlite:///{path}")
    try:
        settings = _settings(engine)
        assert settings["transaction control"].value == "autocommit"
        assert settings["transaction control"].meaning == (
            "no transaction: every statement commits on its own, and a rollback "
            "undoes nothing"
        )
        assert settings["visibility"].value == "per statement"
        with engine.connect() as session:
            session.execute(text("UPDATE sg_doctor SET v = 'mine' WHERE id = 1"))
            with other.connect() as seen:
                assert _value(seen) == "mine"  # committed on its own
            session.rollback()
            _set(other, "theirs")
            assert _value(session) == "theirs"
        with other.connect() as seen:
            assert _value(seen) == "theirs"
    finally:
        engine.dispose()
        other.dispose()


def test_sqlite_read_only_url(tmp_path):
    """mode=ro: 'writes fail ('attempt to write a readonly database'); reads are
    unchanged'."""
    path = _sqlite_file(tmp_path)
    url = f"sqlite:///file:{path}?mode=ro&uri=true"
    read_only = _settings(url)["read-only"]
    assert (read_only.value, read_only.meaning) == (
        "on",
        "writes fail ('attempt to write a readonly database'); reads are unchanged",
    )
    assert _settings(f"sqlite:///{path}")["read-only"].value == "off"
    engine = create_engine(url)
    writer = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as session:
            with pytest.raises(exc.OperationalError, match="readonly database"):
                session.execute(text("UPDATE sg_doctor SET v = 'mine' WHERE id = 1"))
            session.rollback()
            _set(writer, "new")
            assert _value(session) == "new"
    finally:
        engine.dispose()
        writer.dispose()


# -- PostgreSQL ------------------------------------------------------------------------


def _pg_table(engine: Any) -> None:
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS sg_doctor"))
        connection.execute(text("CREATE TABLE sg_doctor (id int PRIMARY KEY, v text)"))
        connection.execute(text("INSERT INTO sg_doctor VALUES (1, 'old')"))


@pytest.fixture
def pg(pg_url):
    url = make_url(pg_url).set(drivername="postgresql+psycopg")
    engines: list[Any] = []

    def engine(**kwargs: Any) -> Any:
        made = create_engine(url, **kwargs)
        engines.append(made)
        return made

    _pg_table(engine())
    yield engine
    with engines[0].begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS sg_doctor"))
    for made in engines:
        made.dispose()


def test_postgresql_read_committed_sees_each_commit(pg):
    """READ COMMITTED: 'each statement sees what other connections committed
    before it'."""
    engine = pg()
    settings = _settings(engine)
    assert settings["isolation level"].value == "READ COMMITTED"
    assert settings["visibility"].value == "per statement"
    assert settings["visibility"].meaning.startswith(
        "each statement sees what other connections committed before it"
    )
    with engine.connect() as session:
        assert _value(session) == "old"
        _set(pg(), "new")
        assert _value(session) == "new"
        session.rollback()


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_postgresql_snapshot_from_the_first_statement(pg, level):
    """REPEATABLE READ / SERIALIZABLE: 'one snapshot, taken at its first statement:
    other connections' commits stay invisible until it ends'."""
    engine = pg(isolation_level=level)
    settings = _settings(engine)
    assert settings["isolation level"].value == level
    assert settings["visibility"].value == "snapshot"
    assert settings["visibility"].meaning == (
        "the transaction reads one snapshot, taken at its first statement: other "
        "connections' commits stay invisible until it ends"
    )
    writer = pg()
    with engine.connect() as session:
        session.execute(text("SELECT 1"))  # the first statement takes the snapshot
        _set(writer, "new")
        assert _value(session) == "old"
        session.rollback()
        assert _value(session) == "new"
        session.rollback()


def test_postgresql_default_transaction_isolation(pg):
    """'what new transactions get unless the client asks otherwise'."""
    options = {"options": "-c default_transaction_isolation=repeatable\\ read"}
    settings = _settings(pg(connect_args=options))
    assert settings["default_transaction_isolation"].value == "REPEATABLE READ"
    assert settings["isolation level"].value == "REPEATABLE READ"
    asked = _settings(pg(connect_args=options, isolation_level="READ COMMITTED"))
    assert asked["default_transaction_isolation"].value == "REPEATABLE READ"
    assert asked["isolation level"].value == "READ COMMITTED"


def test_postgresql_synchronous_commit_off_is_seen_just_the_same(pg):
    """'durability only: ... other sessions see the commit just the same'."""
    writer = pg(connect_args={"options": "-c synchronous_commit=off"})
    setting = _settings(writer)["synchronous_commit"]
    assert setting.value == "off"
    assert setting.affects_visibility is False
    assert setting.meaning.endswith("other sessions see the commit just the same")
    reader = pg()
    with reader.connect() as session:
        assert _value(session) == "old"
        _set(writer, "new")
        assert _value(session) == "new"
        session.rollback()


def test_postgresql_read_only(pg):
    """read-only on: writes fail; reads are unchanged (still see others' commits)."""
    engine = pg(connect_args={"options": "-c default_transaction_read_only=on"})
    read_only = _settings(engine)["read-only"]
    assert read_only.value == "on"
    assert read_only.meaning.startswith("writes fail ('cannot execute")
    assert _settings(pg())["read-only"].value == "off"
    with engine.connect() as session:
        assert _value(session) == "old"
        _set(pg(), "new")
        assert _value(session) == "new"
        with pytest.raises(exc.InternalError, match="read-only transaction"):
            session.execute(text("UPDATE sg_doctor SET v = 'mine' WHERE id = 1"))
        session.rollback()


# -- MariaDB / MySQL -------------------------------------------------------------------


@pytest.fixture
def maria(mysql_url):
    url = make_url(mysql_url)
    engines: list[Any] = []

    def engine(*init: str, **kwargs: Any) -> Any:
        connect_args = {"init_command": "; ".join(init)} if init else {}
        made = create_engine(url, connect_args=connect_args, **kwargs)
        engines.append(made)
        return made

    _pg_table(engine())  # the same portable DDL
    yield engine
    with engines[0].begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS sg_doctor"))
    for made in engines:
        made.dispose()


def test_mariadb_default_repeatable_read_snapshot_from_the_first_read(maria):
    """REPEATABLE READ: 'one snapshot, taken at its first read: ... (UPDATE, DELETE
    and SELECT ... FOR UPDATE read the latest committed rows)'."""
    engine = maria()
    settings = _settings(engine)
    assert settings["isolation level"].value == "REPEATABLE READ"
    assert settings["visibility"].value == "snapshot"
    assert settings["visibility"].meaning.startswith(
        "the transaction reads one snapshot, taken at its first read: other "
        "connections' commits stay invisible until it ends (UPDATE, DELETE and "
        "SELECT ... FOR UPDATE read the latest committed rows)"
    )
    writer = maria()
    with engine.connect() as session:
        session.execute(text("SELECT 1"))  # no table read yet: no snapshot
        _set(writer, "before first read")
        assert _value(session) == "before first read"
        _set(writer, "new")
        assert _value(session) == "before first read"
        locking = text("SELECT v FROM sg_doctor WHERE id = 1 FOR UPDATE")
        assert session.execute(locking).scalar_one() == "new"
        session.rollback()
        assert _value(session) == "new"
        session.rollback()


def test_mariadb_read_committed_sees_each_commit(maria):
    """READ COMMITTED: 'each statement sees what other connections committed
    before it'."""
    engine = maria(isolation_level="READ COMMITTED")
    settings = _settings(engine)
    assert settings["isolation level"].value == "READ COMMITTED"
    assert settings["visibility"].value == "per statement"
    with engine.connect() as session:
        assert _value(session) == "old"
        _set(maria(), "new")
        assert _value(session) == "new"
        session.rollback()


def test_mariadb_read_uncommitted_sees_uncommitted_changes(maria):
    """READ UNCOMMITTED: 'sees other connections' changes even before they commit'."""
    engine = maria(isolation_level="READ UNCOMMITTED")
    visibility = _settings(engine)["visibility"]
    assert visibility.value == "uncommitted"
    assert "changes even before they commit" in visibility.meaning
    with engine.connect() as session, maria().connect() as writer:
        writer.execute(text("UPDATE sg_doctor SET v = 'uncommitted' WHERE id = 1"))
        assert _value(session) == "uncommitted"
        writer.rollback()
        assert _value(session) == "old"
        session.rollback()


def test_mariadb_serializable_reads_lock_out_writers(maria):
    """SERIALIZABLE: 'plain SELECTs take shared locks: another connection's change
    to a row the transaction has read waits until it ends'."""
    engine = maria(isolation_level="SERIALIZABLE")
    visibility = _settings(engine)["visibility"]
    assert visibility.value == "locked reads"
    writer = maria("SET innodb_lock_wait_timeout = 1")
    with engine.connect() as session:
        assert _value(session) == "old"
        with pytest.raises(exc.OperationalError, match="Lock wait timeout"):
            _set(writer, "new")
        session.rollback()
    _set(writer, "new")


def test_mariadb_autocommit(maria):
    """Session autocommit ON: 'every statement commits on its own'; global autocommit
    is 'what new connections start with; SQLAlchemy's drivers turn it off'."""
    default = _settings(maria())
    assert default["autocommit (session)"].value == "OFF"
    assert default["autocommit (global)"].value == "ON"
    engine = maria(isolation_level="AUTOCOMMIT")
    settings = _settings(engine)
    assert settings["autocommit (session)"].value == "ON"
    assert settings["autocommit (session)"].meaning == (
        "every statement commits on its own"
    )
    assert settings["visibility"].value == "per statement"
    with engine.connect() as session:
        session.execute(text("UPDATE sg_doctor SET v = 'mine' WHERE id = 1"))
        with maria().connect() as other:
            assert _value(other) == "mine"
        _set(maria(), "theirs")
        assert _value(session) == "theirs"


@pytest.mark.parametrize("snapshot_isolation", ["OFF", "ON"])
def test_mariadb_innodb_snapshot_isolation(maria, snapshot_isolation):
    """OFF: writing a row changed after the snapshot 'succeeds on the newer row, and
    later reads of that row show it'; ON: it 'fails ('Record has changed since last
    read')'."""
    engine = maria(f"SET SESSION innodb_snapshot_isolation = {snapshot_isolation}")
    with engine.connect() as connection:
        exists = connection.execute(
            text("SHOW VARIABLES LIKE 'innodb_snapshot_isolation'")
        ).first()
    if exists is None:
        pytest.skip("this server has no innodb_snapshot_isolation (MariaDB < 10.6.18)")
    setting = _settings(engine)["innodb_snapshot_isolation"]
    assert setting.value == snapshot_isolation
    writer = maria()
    with engine.connect() as session:
        assert _value(session) == "old"
        with writer.begin() as other:
            other.execute(
                text("UPDATE sg_doctor SET v = 'theirs', id = 1 WHERE id = 1")
            )
        write = text("UPDATE sg_doctor SET v = CONCAT(v, '+mine') WHERE id = 1")
        if snapshot_isolation == "ON":
            assert "fails ('Record has changed since last read')" in setting.meaning
            with pytest.raises(exc.DatabaseError, match="Record has changed"):
                session.execute(write)
        else:
            assert setting.meaning.endswith(
                "succeeds on the newer row, and later reads of that row show it"
            )
            session.execute(write)
            assert _value(session) == "theirs+mine"
        session.rollback()


def test_mariadb_read_only(maria):
    """read-only on: writes fail; reads are unchanged."""
    engine = maria(
        "SET SESSION TRANSACTION READ ONLY", isolation_level="READ COMMITTED"
    )
    read_only = _settings(engine)["read-only"]
    assert read_only.value == "on"
    assert read_only.meaning.startswith("writes fail ('Cannot execute statement")
    assert _settings(maria())["read-only"].value == "off"
    with engine.connect() as session:
        assert _value(session) == "old"
        _set(maria(), "new")
        assert _value(session) == "new"
        with pytest.raises(exc.DatabaseError, match="READ ONLY transaction"):
            session.execute(text("UPDATE sg_doctor SET v = 'mine' WHERE id = 1"))
        session.rollback()


def test_mariadb_url_with_init_command_is_read_as_given(maria, mysql_url):
    """The URL's own init_command (what the application gets) is what doctor reads."""
    url = make_url(mysql_url).update_query_dict(
        {"init_command": "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"}
    )
    status, out, _ = _run(url.render_as_string(hide_password=False))
    assert status == 0
    assert "isolation level                 READ COMMITTED" in out
    assert "transaction_isolation (global)  REPEATABLE READ" in out


# -- the diff: status 1 only for a difference in what a session reads ------------------


def test_sqlite_journal_modes_differ_but_not_in_what_a_session_reads(tmp_path):
    """Under legacy control reads run outside transactions: journal_mode listed, 0."""
    plain = _sqlite_file(tmp_path, "plain.sqlite")
    wal = _sqlite_file(tmp_path, "wal.sqlite", wal=True)
    status, out, _ = _run(f"sqlite:///{plain}", f"sqlite:///{wal}")
    assert status == 0
    assert "~  journal_mode" in out


def test_same_settings_exit_0(tmp_path):
    """Two databases with the same relevant settings: exit 0."""
    urls = [f"sqlite:///{_sqlite_file(tmp_path, name)}" for name in ("a.db", "b.db")]
    status, out, _ = _run(*urls)
    assert status == 0
    assert "!" not in out.split("side by side:")[1].split("\n! ")[0]


def test_sqlite_and_postgresql_read_committed_exit_0(tmp_path, pg_url):
    """Settings one side lacks are listed, not counted: SQLite vs PostgreSQL is 0."""
    sqlite_url = f"sqlite:///{_sqlite_file(tmp_path)}"
    status, out, _ = _run(sqlite_url, pg_url)
    assert status == 0, out
    assert "~  transaction control" in out
    assert "~  synchronous_commit" in out


def test_passes_on_sqlite_fails_on_mariadb_exit_1(tmp_path, mysql_url):
    """SQLite (per statement) vs MariaDB's REPEATABLE READ (snapshot): status 1."""
    sqlite_url = f"sqlite:///{_sqlite_file(tmp_path)}"
    status, out, _ = _run(sqlite_url, mysql_url)
    assert status == 1
    assert "!  visibility" in out
    assert "the same code can read fresh data on one and stale data on the other" in out


def test_isolation_differs_between_two_servers_exit_1(pg_url, mysql_url, tmp_path):
    """PostgreSQL READ COMMITTED vs MariaDB REPEATABLE READ, with SQLite beside."""
    sqlite_url = f"sqlite:///{_sqlite_file(tmp_path)}"
    status, out, _ = _run(pg_url, mysql_url, sqlite_url)
    assert status == 1
    assert "!  isolation level " in out  # two sides have it: counted


def test_table_columns_line_up(tmp_path, mysql_url):
    """Every row of the side-by-side table starts each column at the same offset."""
    sqlite_url = f"sqlite:///{_sqlite_file(tmp_path)}"
    _, out, _ = _run(sqlite_url, mysql_url)
    table = out.split("side by side:\n")[1].split("\n\n")[0].splitlines()
    header = next(line for line in table if "[1]" in line and "setting" in line)
    rows = table[table.index(header) + 1 :]
    second, third = header.index("[1]"), header.index("[2]")
    for row in rows:
        assert row[second - 2 : second] == "  ", row
        assert row[second] != " ", row
        assert row[third - 2 : third] == "  ", row
        assert row[third] != " ", row


def test_json_prints_the_same_facts(tmp_path, mysql_url):
    """--json: each database's settings, the differences, and the exit status."""
    sqlite_url = f"sqlite:///{_sqlite_file(tmp_path)}"
    status, out, _ = _run("--json", sqlite_url, mysql_url)
    document = json.loads(out)
    assert document["status"] == status == 1
    first, second = document["databases"]
    assert first["system"] == "sqlite"
    assert second["system"] == "mariadb"
    names = {s["name"]: s for s in second["settings"]}
    assert names["visibility"]["value"] == "snapshot"
    assert set(names["visibility"]) == {
        "name",
        "value",
        "meaning",
        "affects_visibility",
    }
    [visibility] = [d for d in document["differences"] if d["name"] == "visibility"]
    assert visibility == {
        "name": "visibility",
        "values": ["per statement", "snapshot"],
        "counted": True,
    }
    one_sided = [d for d in document["differences"] if d["name"] == "journal_mode"]
    assert one_sided == [
        {"name": "journal_mode", "values": ["delete", None], "counted": False}
    ]


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_async_and_sync_drivers_read_the_same(pg_url, driver):
    """An asyncio URL is read through its own driver, with the same facts."""
    url = make_url(pg_url).set(drivername=f"postgresql+{driver}")
    status, out, err = _run("--json", url.render_as_string(hide_password=False))
    assert (status, err) == (0, "")
    [database] = json.loads(out)["databases"]
    values = {s["name"]: s["value"] for s in database["settings"]}
    assert values["visibility"] == "per statement"
    assert values["isolation level"] == "READ COMMITTED"


def test_mysql_url_to_mariadb_says_mariadb(mysql_url):
    """A mysql:// URL that reaches MariaDB is reported as MariaDB."""
    url = make_url(mysql_url).set(drivername="mysql+pymysql")
    status, out, _ = _run("--json", url.render_as_string(hide_password=False))
    assert status == 0
    [database] = json.loads(out)["databases"]
    version = next(s for s in database["settings"] if s["name"] == "server version")
    expected = "mariadb" if "mariadb" in version["value"].lower() else "mysql"
    assert database["system"] == expected
