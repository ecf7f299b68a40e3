"""Identity-map logging through structlog, and enforced expiry that loses nothing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

from sessionguard import install_guard

from .models import Address, User


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def test_transaction_events_have_the_contract_fields(db, seed):
    """session.begin/commit/rollback are debug events with size, statements, duration."""
    seed(db)
    engine = db.engine()
    install_guard(engine, log_level="debug")
    with capture_logs() as logs, Session(engine) as session:
        users = session.scalars(select(User)).all()  # held: the map is weak
        addresses = session.scalars(select(Address)).all()
        session.commit()
        session.get(User, 1)
        session.rollback()
    del users, addresses
    begins = _events(logs, "session.begin")
    commits = _events(logs, "session.commit")
    rollbacks = _events(logs, "session.rollback")
    assert [entry["log_level"] for entry in begins + commits + rollbacks] == [
        "debug"
    ] * 4
    assert [entry["identity_map_size"] for entry in begins] == [0, 2]
    [commit] = commits
    assert commit["identity_map_size"] == 2
    assert commit["statements"] == 2
    assert commit["duration_ms"] >= 0
    [rollback] = rollbacks
    assert rollback["statements"] == 1
    session_ids = {entry["session_id"] for entry in begins + commits + rollbacks}
    assert session_ids == {session.hash_key}


def test_closing_mid_transaction_ends_it_as_rollback(sqlite_db, seed):
    """A session closed inside a transaction logs session.rollback and counts it."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine, log_level="debug")
    with capture_logs() as logs:
        session = Session(engine)
        session.get(User, 1)
        session.close()
    assert [entry["event"] for entry in logs] == ["session.begin", "session.rollback"]
    assert guard.stats().rollbacks == 1
    assert guard.stats().transactions == 1


def test_savepoints_are_not_transactions(sqlite_db, seed):
    """begin_nested() inside a transaction is not logged as a transaction of its own."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine, log_level="debug")
    with capture_logs() as logs, Session(engine) as session:
        session.get(User, 1)
        with session.begin_nested():
            session.get(Address, 1)
        nested = session.begin_nested()
        nested.rollback()
        session.commit()
    assert [entry["event"] for entry in logs] == ["session.begin", "session.commit"]
    assert guard.stats().transactions == 1
    assert guard.stats().commits == 1
    assert guard.stats().rollbacks == 0


def test_max_identity_map_size_is_a_high_water_mark(sqlite_db, seed):
    """stats().max_identity_map_size is the largest map seen at a boundary."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine, log_level="debug")
    with Session(engine) as session:
        users = session.scalars(select(User)).all()  # held: the map is weak
        addresses = session.scalars(select(Address)).all()
        session.commit()
    assert guard.stats().max_identity_map_size == 2
    del users, addresses


def test_expire_on_commit_enforced_for_expire_on_commit_false(db, seed):
    """expire={'commit'} expires a session made with expire_on_commit=False."""
    seed(db)
    engine = db.engine()
    session = Session(engine, expire_on_commit=False)
    user = session.get(User, 1)
    session.commit()
    assert "name" in user.__dict__  # without the guard: still loaded after commit
    session.close()

    guard = install_guard(engine, expire={"commit"}, log_level="debug")
    session = Session(engine, expire_on_commit=False)
    user = session.get(User, 1)
    with capture_logs() as logs:
        session.commit()
    assert "name" not in user.__dict__
    [expired] = _events(logs, "expire_all")
    assert expired["reason"] == "commit"
    assert expired["objects"] == 1
    assert expired["log_level"] == "debug"
    assert guard.stats().expire_all_calls == 1
    with Session(db.engine()) as other:
        other.execute(update(User).values(name="bob"))
        other.commit()
    assert user.name == "bob"
    session.close()


def test_expire_at_begin_reads_fresh_data(db, seed):
    """expire={'begin'} makes the next transaction reload what the last one cached."""
    seed(db)
    engine = db.engine()
    install_guard(engine, expire={"begin"}, log_level="debug")
    session = Session(engine, expire_on_commit=False)
    user = session.get(User, 1)
    session.commit()
    with Session(db.engine()) as other:
        other.execute(update(User).values(name="bob"))
        other.commit()
    assert session.scalars(select(User)).one().name == "bob"
    assert user.name == "bob"
    session.close()


def test_expire_at_begin_keeps_unflushed_changes_of_an_autobegun_flush(db, seed):
    """A change made between transactions survives the flush that autobegins one."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine, expire={"begin"}, log_level="debug")
    session = Session(engine, expire_on_commit=False)
    user = session.get(User, 1)
    address = session.get(Address, 1)
    session.commit()
    assert not session.in_transaction()
    user.name = "changed outside a transaction"
    session.add(Address(id=2, street="2 Side St", user=user))
    with capture_logs() as logs:
        session.flush()  # autobegins: after_begin expires, but not these
    session.commit()
    [expired] = _events(logs, "expire_all")
    assert expired["reason"] == "begin"
    assert expired["kept_modified"] >= 1  # the flush's own objects stay loaded
    assert guard.stats().expire_all_calls == 2  # the first get()'s begin, the flush
    with Session(db.engine()) as check:
        assert check.get(User, 1).name == "changed outside a transaction"
        assert check.get(Address, 2).user_id == 1
    assert address.street == "1 Main St"
    session.close()


def test_expiry_never_discards_a_pending_change(sqlite_db, seed):
    """An object with unflushed attribute changes is left alone by enforced expiry.

    (Only expiry at begin can meet one: a commit flushes before it expires.)
    """
    seed(sqlite_db)
    engine = sqlite_db.engine()
    install_guard(engine, expire={"begin"}, log_level="debug")
    session = Session(engine, expire_on_commit=False, autoflush=False)
    user = session.get(User, 1)
    address = session.get(Address, 1)
    session.commit()
    user.name = "pending"
    # a begin with no flush: a read under no_autoflush starts the transaction
    session.scalars(select(Address)).all()
    session.commit()
    assert user.name == "pending"
    with Session(sqlite_db.engine()) as check:
        assert check.get(User, 1).name == "pending"
    del address
    session.close()


def test_assigning_the_same_value_is_not_kept_from_expiry(sqlite_db, seed):
    """An attribute set to the value it had is no pending change: the object expires."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    install_guard(engine, expire={"begin"}, log_level="debug")
    session = Session(engine, expire_on_commit=False, autoflush=False)
    user = session.get(User, 1)
    session.commit()
    user.name = "alice"
    with capture_logs() as logs:
        session.scalars(select(Address)).all()
    [expired] = _events(logs, "expire_all")
    assert expired["kept_modified"] == 0
    assert "name" not in user.__dict__
    session.close()


def test_default_log_level_info_emits_no_transaction_lines(sqlite_db, seed):
    """log_level defaults to info: no session.begin/commit/rollback or expire_all lines."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine, expire={"begin"})
    assert guard.config.log_level == "info"
    with capture_logs() as logs, Session(engine) as session:
        session.get(User, 1)
        session.commit()
        session.get(User, 1)
    assert logs == []
    assert guard.stats().transactions == 2


def test_events_below_the_level_are_not_built(sqlite_db, seed):
    """Below the level the logger is never called: nothing is built for it."""
    seed(sqlite_db)

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def __getattr__(self, level: str) -> Any:
            return lambda event, **fields: self.calls.append(f"{level} {event}")

    for level, expected in (
        ("debug", ["debug session.begin", "debug session.commit"]),
        ("info", []),
        ("error", []),
    ):
        recorder = Recorder()
        engine = sqlite_db.engine()
        guard = install_guard(engine, log_level=level, logger=recorder)
        with Session(engine) as session:
            session.get(User, 1)
            session.commit()
        guard.uninstall()
        assert recorder.calls == expected, level


def test_the_default_logger_is_bound_once_and_again_after_reconfiguration(
    sqlite_db, seed
):
    """structlog's lazy proxy is resolved on first use, not per event; capture_logs() still sees events."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine, log_level="debug")
    telemetry = guard._telemetry
    with capture_logs() as first:
        assert telemetry.log is telemetry.log
        with Session(engine) as session:
            session.get(User, 1)
    with capture_logs() as second, Session(engine) as session:
        session.get(User, 1)
    assert [entry["event"] for entry in first] == ["session.begin", "session.rollback"]
    assert [entry["event"] for entry in second] == ["session.begin", "session.rollback"]
