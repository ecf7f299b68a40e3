"""One guard, many threads: counters and findings are exact under concurrency."""

from __future__ import annotations

import collections
import threading
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.orm import Session

from sessionguard import CrossThread, StaleRead, install_guard

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


# -- cross_thread: two threads inside one session at once -------------------------


def _cross_thread(guard) -> list[CrossThread]:
    return [f for f in guard.findings if isinstance(f, CrossThread)]


def test_sequential_handoff_between_threads_is_not_cross_thread(db):
    """One transaction used by thread after thread, never at once: no finding."""
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine) as session:
        session.add(User(id=1, name="alice"))
        session.flush()  # the transaction is open in the main thread

        def use(ident: int) -> None:
            session.scalars(select(User)).all()
            session.add(User(id=ident, name="x"))
            session.flush()

        for ident in range(10, 13):
            worker = threading.Thread(target=use, args=(ident,))
            worker.start()
            worker.join()
        session.scalars(select(User)).all()
        session.commit()
    assert _cross_thread(guard) == []


def test_testclient_shared_session_is_not_cross_thread(db):
    """A session shared with FastAPI's TestClient (portal and worker threads) is not a finding."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    engine = db.engine()
    guard = install_guard(engine)
    app = FastAPI()
    shared = Session(engine, expire_on_commit=False)

    def get_session() -> Session:
        raise AssertionError("overridden")  # pragma: no cover

    @app.get("/users")
    def list_users(session: Session = Depends(get_session)) -> list[str]:  # noqa: B008
        return [user.name for user in session.scalars(select(User))]

    @app.post("/users/{name}")
    async def add_user(name: str, session: Session = Depends(get_session)) -> int:  # noqa: B008
        user = User(id=len(session.scalars(select(User)).all()) + 1, name=name)
        session.add(user)
        session.flush()
        return user.id

    app.dependency_overrides[get_session] = lambda: shared
    with TestClient(app) as client:
        shared.add(User(id=100, name="fixture"))
        shared.flush()  # the test's thread opens the transaction
        for name in ("a", "b", "c"):
            assert client.post(f"/users/{name}").status_code == 200  # portal thread
            assert len(client.get("/users").json()) >= 2  # a worker thread
        assert len(shared.scalars(select(User)).all()) == 4  # back in the test
    shared.rollback()
    shared.close()
    assert _cross_thread(guard) == []


def _meet_inside(engine: Any, works: dict[str, Any]) -> list[threading.Thread]:
    """
    Run each of *works* (thread name -> callable using one session) in a thread
    of its own, the threads meeting at a barrier inside their first statement:
    both are inside the session at once. Returns the finished threads.
    """
    inside = threading.Barrier(len(works), timeout=10)
    waiting = threading.local()
    # Once all are inside, the statements themselves run one at a time: a
    # DBAPI connection used by two threads at once may break (PyMySQL does).
    one_at_a_time = threading.Lock()

    def meet(*args: Any) -> None:
        if getattr(waiting, "armed", False):
            waiting.armed = False
            inside.wait()
            one_at_a_time.acquire()
            waiting.holding = True

    def leave(*args: Any) -> None:
        if getattr(waiting, "holding", False):
            waiting.holding = False
            one_at_a_time.release()

    errors: list[BaseException] = []

    def run(work: Any) -> None:
        try:
            waiting.armed = True
            work()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)
            inside.abort()

    event.listen(engine, "before_cursor_execute", meet)
    event.listen(engine, "after_cursor_execute", leave)
    workers = [
        threading.Thread(target=run, args=(work,), name=name)
        for name, work in works.items()
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        event.remove(engine, "before_cursor_execute", meet)
        event.remove(engine, "after_cursor_execute", leave)
    assert errors == []
    return workers


def _thread_names(workers: list[threading.Thread]) -> set[str]:
    return {f"{worker.name} ({worker.ident})" for worker in workers}


def test_two_threads_inside_one_session_at_once_is_one_cross_thread(db):
    """Two threads meeting at a barrier inside a statement of one session: exactly one finding."""
    engine = db.engine()
    guard = install_guard(engine)
    session = Session(engine)
    session.execute(select(User)).all()  # the transaction is open

    def read() -> None:
        session.execute(select(User)).all()

    workers = _meet_inside(engine, {"reader-0": read, "reader-1": read})
    session.rollback()
    session.close()
    (finding,) = _cross_thread(guard)
    assert {finding.first_thread, finding.other_thread} == _thread_names(workers)
    assert finding.location is not None
    assert finding.location.startswith(__file__)


def test_a_flush_overlapping_another_threads_statement_is_one_cross_thread(db):
    """A flush in one thread while another thread runs a statement: one finding."""
    engine = db.engine()
    guard = install_guard(engine)
    session = Session(engine)
    session.execute(select(User)).all()  # the transaction is open
    session.add(User(id=7, name="pending"))

    def read() -> None:
        # text() does not autoflush: this thread only reads.
        session.execute(text("SELECT 1")).all()

    workers = _meet_inside(engine, {"flusher": session.flush, "reader": read})
    session.rollback()
    session.close()
    (finding,) = _cross_thread(guard)
    assert {finding.first_thread, finding.other_thread} == _thread_names(workers)


def test_a_session_collected_while_the_counts_are_read_counts_once(sqlite_db):
    """
    The sessions' counts are summed over a snapshot of the live sessions: one
    collected after the snapshot was taken (another thread, the garbage
    collector) is counted once, in stats() and after clear().
    """
    import gc

    engine = sqlite_db.engine()
    guard = install_guard(engine)
    session = Session(engine)
    session.execute(text("SELECT 1"))
    session.commit()
    live = list(guard._sessions.values())  # what stats() snapshots first
    del session
    gc.collect()  # the session goes: its state moves to the retired counts
    stats = guard._counters.snapshot(live)
    assert (stats.transactions, stats.commits, stats.statements) == (1, 1, 1)
    guard._counters.reset(live)
    assert guard.stats().transactions == 0
