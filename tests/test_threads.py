"""One guard, many threads: counters and findings are exact under concurrency."""

from __future__ import annotations

import collections
import threading
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from sessionguard import StaleRead, install_guard

from .models import User

THREADS = 8
ROUNDS = 5
_INSERT = text(
    "INSERT INTO sg_users (id, name, password_hash) VALUES (:id, 'old', 'h')"
)


def _rows_of(thread: int) -> list[int]:
    """Thread *thread* owns thread + 1 rows, so that every thread's count differs."""
    return [100 * (thread + 1) + offset for offset in range(thread + 1)]


@pytest.mark.parametrize("target", ["engine", "every session"])
def test_concurrent_sessions_count_exactly(db, target):
    """8 threads, 8 sessions, 1 guard: stale_reads, findings and counters are exact."""
    engine, writer = db.engine(), db.engine()
    with writer.begin() as connection:
        for thread in range(THREADS):
            for ident in _rows_of(thread):
                connection.execute(
                    _INSERT,
                    {"id": ident},
                )
    guard = install_guard(engine if target == "engine" else None)

    loaded = threading.Barrier(THREADS + 1)
    written = threading.Barrier(THREADS + 1)
    session_ids: dict[int, int] = {}
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        mine = _rows_of(thread)
        try:
            with Session(engine, expire_on_commit=False) as session:
                session_ids[thread] = session.hash_key
                statement = select(User).where(User.id.in_(mine)).order_by(User.id)
                held = list(session.scalars(statement))  # loads: not hits
                assert len(held) == len(mine)
                session.commit()
                loaded.wait()
                # The writer commits here, while no session holds a transaction
                # (SQLite: and no write lock).
                written.wait()
                for _ in range(ROUNDS):
                    for ident in mine:
                        user = session.get(User, ident)
                        assert user is held[mine.index(ident)]
                        assert user.name == "old"  # stale, and reported
                    assert list(session.scalars(statement)) == held
                session.commit()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)
            loaded.abort()
            written.abort()

    workers = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
    for worker in workers:
        worker.start()
    try:
        loaded.wait()
        with writer.begin() as connection:
            connection.execute(text("UPDATE sg_users SET name = 'new'"))
        written.wait()
    except threading.BrokenBarrierError:
        pass  # a worker failed: its error is asserted below
    for worker in workers:
        worker.join()
    assert errors == []

    total_rows = sum(thread + 1 for thread in range(THREADS))  # 36
    # Each round: one get() hit per row and one select() hit per row.
    expected_stale = ROUNDS * 2 * total_rows
    stats = guard.stats()
    assert stats.stale_reads == expected_stale
    assert len(guard.findings) == expected_stale
    assert stats.identity_map_hits == expected_stale
    assert stats.verified_objects == expected_stale
    # One loading select and ROUNDS checked selects per thread; get() hits
    # emit no statement.
    assert stats.statements == THREADS * (1 + ROUNDS)
    # The load, then the transaction the first checked select began.
    assert stats.transactions == 2 * THREADS
    assert stats.commits == 2 * THREADS
    assert stats.rollbacks == 0
    assert stats.verification_errors == 0
    assert stats.skipped_checks == 0
    assert stats.max_identity_map_size == THREADS

    per_object = collections.Counter(
        (finding.session_id, finding.identity)
        for finding in guard.findings
        if isinstance(finding, StaleRead)
    )
    expected_per_object = {
        (session_ids[thread], (ident,)): 2 * ROUNDS
        for thread in range(THREADS)
        for ident in _rows_of(thread)
    }
    assert per_object == expected_per_object
    assert all(
        isinstance(finding, StaleRead)
        and [diff.name for diff in finding.attributes] == ["name"]
        and not finding.deleted
        for finding in guard.findings
    )


def test_findings_from_threads_stay_bounded(sqlite_db):
    """Concurrent stale reads never push the findings list past max_findings."""
    engine, writer = sqlite_db.engine(), sqlite_db.engine()
    with writer.begin() as connection:
        for thread in range(THREADS):
            connection.execute(
                _INSERT,
                {"id": thread + 1},
            )
    guard = install_guard(engine, max_findings=10)
    sessions: list[Any] = []
    held: list[User] = []
    for thread in range(THREADS):
        session = Session(engine, expire_on_commit=False)
        held.append(session.get(User, thread + 1))
        session.commit()
        sessions.append(session)
    with writer.begin() as connection:
        connection.execute(text("UPDATE sg_users SET name = 'new'"))
    start = threading.Barrier(THREADS)

    seen: list[str] = []

    def work(thread: int) -> None:
        start.wait()
        for _ in range(ROUNDS):
            seen.append(sessions[thread].get(User, thread + 1).name)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for session in sessions:
        session.close()
    assert seen == ["old"] * (THREADS * ROUNDS)  # every read returned stale data
    assert guard.stats().stale_reads == THREADS * ROUNDS
    assert len(guard.findings) == 10
