"""How a guard sees the statements a session runs: once each, without a do_orm_execute listener."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, select, text, update
from sqlalchemy.orm import ORMExecuteState, Session

from sessionguard import UnsynchronizedWrite, install_guard

from .models import User

_ORIGINAL_EXECUTE = Session.__dict__["_execute_internal"]


def _rename(db: Any, name: str) -> None:
    with db.engine().begin() as connection:
        connection.execute(update(User).where(User.id == 1).values(name=name))


def test_a_guard_leaves_sqlalchemy_building_no_orm_execute_state(sqlite_db, seed):
    """
    No do_orm_execute listener: SQLAlchemy runs an ORM statement as without a
    guard (no ORMExecuteState, one orm_pre_session_exec), and the guard still
    counts it; uninstall() puts SQLAlchemy's own _execute_internal back.
    """
    seed(sqlite_db)
    engine = sqlite_db.engine()
    made: list[ORMExecuteState] = []
    original_init = ORMExecuteState.__init__

    def counting_init(self: ORMExecuteState, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original_init(self, *args, **kwargs)

    ORMExecuteState.__init__ = counting_init  # type: ignore[method-assign]
    try:
        guard = install_guard(None)
        with Session(engine) as session:
            assert not session.dispatch.do_orm_execute
            users = session.scalars(select(User)).all()
            assert session.get(User, 1) is users[0]
            session.commit()
        assert made == []
        assert guard.stats().statements == 1  # get() answered from the map
        guard.uninstall()
    finally:
        ORMExecuteState.__init__ = original_init  # type: ignore[method-assign]
    assert Session.__dict__["_execute_internal"] is _ORIGINAL_EXECUTE


def test_a_statement_replayed_by_invoke_statement_is_one_statement(sqlite_db, seed):
    """
    A do_orm_execute hook that runs the statement itself (invoke_statement(),
    the caching recipe) is one statement, and what it serves from the map is
    still checked.
    """
    seed(sqlite_db)
    engine = sqlite_db.engine()
    replayed = []

    def replay(orm_state: ORMExecuteState) -> Any:
        replayed.append(orm_state.statement)
        return orm_state.invoke_statement()

    event.listen(Session, "do_orm_execute", replay)
    try:
        guard = install_guard(engine)
        session = Session(engine, expire_on_commit=False)
        user = session.scalars(select(User)).one()
        session.commit()
        _rename(sqlite_db, "bob")
        assert session.scalars(select(User)).one().name == "alice"  # stale
        session.commit()
        session.close()
    finally:
        event.remove(Session, "do_orm_execute", replay)
    assert len(replayed) == 2
    stats = guard.stats()
    assert stats.statements == 2
    assert stats.stale_reads == 1
    del user


def test_statements_of_a_transaction_begun_before_install_are_seen(sqlite_db, seed):
    """
    A session whose transaction began before the guard was installed: its
    next statements are counted, and a text() UPDATE of a table whose objects
    it holds is an unsynchronized write (the row changes, the object not).
    """
    seed(sqlite_db)
    engine = sqlite_db.engine()
    session = Session(engine)
    user = session.get(User, 1)  # begins the transaction, unguarded
    guard = install_guard(engine)
    session.execute(text("UPDATE sg_users SET name = 'bob' WHERE id = 1"))
    assert user.name == "alice"  # the object did not follow the write
    assert session.scalars(select(User.name)).one() == "bob"
    stats = guard.stats()
    assert stats.statements == 2
    assert stats.transactions == 0  # it began before the guard
    [finding] = guard.findings
    assert isinstance(finding, UnsynchronizedWrite)
    assert (finding.table, finding.statement) == ("sg_users", "text")
    session.close()


def test_two_guards_count_each_statement_once(sqlite_db, seed):
    """
    A guard on every session and one on the engine, the second installed
    while a session the first watches is inside a transaction: each counts
    every statement it covers once.
    """
    seed(sqlite_db)
    engine = sqlite_db.engine()
    everywhere = install_guard(None)
    session = Session(engine)
    session.get(User, 1)  # watched by the first guard only
    on_engine = install_guard(engine)
    for _ in range(3):
        session.scalars(select(User.id)).all()
    session.commit()
    with Session(engine) as fresh:
        fresh.scalars(select(User.id)).all()
        fresh.commit()
    assert everywhere.stats().statements == 5
    assert on_engine.stats().statements == 4
    assert on_engine.stats().transactions == 1  # fresh's; session's began before
    session.close()


def test_a_write_the_first_statement_makes_is_told_before_it_runs(sqlite_db, seed):
    """
    A session first seen by a statement (its transaction began before the
    guard): an ORM UPDATE without synchronisation is reported before it runs,
    so that warnings turned into errors stop it, as they would for any other
    statement.
    """
    import warnings

    from sessionguard import SessionGuardWarning

    seed(sqlite_db)
    engine = sqlite_db.engine()
    session = Session(engine)
    user = session.get(User, 1)  # the transaction begins unguarded
    install_guard(engine, on_stale="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SessionGuardWarning)
        try:
            session.execute(
                update(User).values(name="bob"),
                execution_options={"synchronize_session": False},
            )
        except SessionGuardWarning:
            pass
        else:
            raise AssertionError("no SessionGuardWarning")
    # The UPDATE did not run: the row still says alice.
    assert session.scalars(select(User.name)).one() == "alice"
    assert user.name == "alice"
    session.close()


def test_a_wrapper_around_the_statement_hook_is_kept_and_not_wrapped_again(
    sqlite_db, seed
):
    """
    Someone wraps Session._execute_internal after the guard (functools.wraps):
    the guard still counts each statement once, says it is installed, and a
    guard installed after an uninstall does not wrap the wrapper again.
    """
    import functools

    seed(sqlite_db)
    engine = sqlite_db.engine()
    first = install_guard(engine)
    ours = Session.__dict__["_execute_internal"]
    calls = []

    @functools.wraps(ours)
    def theirs(self: Session, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return ours(self, *args, **kwargs)

    Session._execute_internal = theirs  # type: ignore[method-assign]
    try:
        assert first.installed
        with Session(engine) as session:
            session.scalars(select(User.id)).all()
        assert first.stats().statements == 1
        first.uninstall()
        second = install_guard(engine)
        assert Session.__dict__["_execute_internal"] is theirs
        with Session(engine) as session:
            session.scalars(select(User.id)).all()
            session.scalars(select(User.id)).all()
        assert second.stats().statements == 2
        assert len(calls) == 3
        second.uninstall()
    finally:
        Session._execute_internal = _ORIGINAL_EXECUTE  # type: ignore[method-assign]


def test_each_guard_samples_statements_at_its_own_rate(sqlite_db, seed):
    """
    Two guards, at 0.5 and 0.2, on the same hits: each checks about its own
    share of the statements (the statement hook's one coin is for the highest
    rate, each guard then takes its part of what it let through).
    """
    seed(sqlite_db)
    engine = sqlite_db.engine()
    half = install_guard(engine, sample_rate=0.5)
    fifth = install_guard(None, sample_rate=0.2)
    session = Session(engine, expire_on_commit=False)
    user = session.scalars(select(User)).one()
    session.commit()
    for _ in range(600):
        assert session.scalars(select(User)).one() is user  # a hit each time
    session.close()
    # Binomial(600, p): these bounds are about six deviations wide.
    assert 225 <= half.stats().verified_objects <= 375
    assert 60 <= fifth.stats().verified_objects <= 180
    assert half.stats().identity_map_hits == half.stats().verified_objects
