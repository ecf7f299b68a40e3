"""
A guard never changes what SQLAlchemy does.

Each scenario runs first without a guard, then under a guard on every session
at sample rates 1.0 and 0.0, and must give the same observable outcome (values,
result types, exceptions), with no internal error of the guard. The scenarios
are the classes of breakage found by running SQLAlchemy's own test suite under
a guard (issue 8); ``scripts/sqlalchemy-suite`` runs the whole of that suite.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    String,
    Table,
    create_engine,
    event,
    lambda_stmt,
    select,
    text,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    composite,
    joinedload,
    mapped_column,
    registry,
    relationship,
    selectinload,
)
from sqlalchemy.orm.events import SessionEvents
from sqlalchemy.pool import StaticPool

from sessionguard import StaleReadError, install_guard


class CompatBase(DeclarativeBase):
    pass


class Parent(CompatBase):
    __tablename__ = "compat_parent"

    id: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[str] = mapped_column(String(20))
    children: Mapped[list[Child]] = relationship(back_populates="parent")


class Child(CompatBase):
    __tablename__ = "compat_child"

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("compat_parent.id"))
    parent: Mapped[Parent] = relationship(back_populates="children")
    toys: Mapped[list[Toy]] = relationship()


class Toy(CompatBase):
    __tablename__ = "compat_toy"

    id: Mapped[int] = mapped_column(primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("compat_child.id"))


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Segment(CompatBase):
    __tablename__ = "compat_segment"

    id: Mapped[int] = mapped_column(primary_key=True)
    x1: Mapped[int] = mapped_column()
    y1: Mapped[int] = mapped_column()
    start: Mapped[Point] = composite("x1", "y1")


# A mapper over an outer join: a person without a badge has an identity whose
# second part is NULL (allow_partial_pks, the default).
_metadata = CompatBase.metadata
_person = Table(
    "compat_person",
    _metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(20)),
)
_badge = Table(
    "compat_badge",
    _metadata,
    Column("id", Integer, primary_key=True),
    Column("person_id", ForeignKey("compat_person.id")),
    Column("label", String(20)),
)


class Badged:
    person_id: int
    badge_id: int | None
    name: str
    label: str | None


registry().map_imperatively(
    Badged,
    _person.outerjoin(_badge, _person.c.id == _badge.c.person_id),
    primary_key=[_person.c.id, _badge.c.id],
    properties={
        "person_id": _person.c.id,
        "badge_id": _badge.c.id,
        "badge_person_id": _badge.c.person_id,
    },
)


RATES = (1.0, 0.0)


def _engine() -> Any:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    CompatBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                Parent(id=1, data="p1", children=[Child(id=1), Child(id=2)]),
                Parent(id=2, data="p2"),
                Toy(id=1, child_id=1),
                Toy(id=2, child_id=1),
            ]
        )
        session.execute(
            _person.insert(), [{"id": 1, "name": "ann"}, {"id": 2, "name": "bo"}]
        )
        session.execute(_badge.insert(), [{"id": 1, "person_id": 1, "label": "gold"}])
        session.add(Segment(id=1, x1=1, y1=2))
        session.commit()
    return engine


def _outcome(scenario: Callable[[Any], Any]) -> Any:
    """What the scenario returned, or the type and message of what it raised."""
    engine = _engine()
    try:
        return ("returned", scenario(engine))
    except Exception as error:  # noqa: BLE001 - the exception is the outcome
        message = re.sub(r" at 0x[0-9a-f]+", "", str(error).split("\n")[0])
        return ("raised", type(error).__name__, message)
    finally:
        engine.dispose()


def assert_unchanged(scenario: Callable[[Any], Any], **config: Any) -> Any:
    """The scenario's outcome without a guard, and the same under one at each rate."""
    baseline = _outcome(scenario)
    for rate in RATES:
        guard = install_guard(None, sample_rate=rate, **config)
        try:
            guarded = _outcome(scenario)
            stats = guard.stats()
        finally:
            guard.uninstall()
        assert guarded == baseline, f"sample_rate={rate}"
        assert stats.internal_errors == 0, f"sample_rate={rate}"
    return baseline


def test_merge_of_new_and_unloaded_objects():
    """merge() fires the mapper load event with context=None: no AttributeError."""

    def scenario(engine: Any) -> Any:
        with Session(engine) as other:
            detached = other.get(Parent, 1)
        with Session(engine) as session:
            merged = session.merge(Parent(id=3, data="new"))
            unloaded = session.merge(detached, load=False)
            return (merged.data, unloaded.data, merged in session)

    assert assert_unchanged(scenario) == ("returned", ("new", "p1", True))


def test_composite_first_access_and_hand_fired_events():
    """refresh fires with a sentinel context for composites; events fired by hand."""

    def scenario(engine: Any) -> Any:
        transient = Segment(id=9, x1=3, y1=4)
        point = transient.start  # refresh(state, object(), ["start"])
        manager = Segment.__mapper__.class_manager
        state = manager.state_getter()(transient)
        manager.dispatch.load(state, None)
        # SQLAlchemy's own tests fire events with fewer arguments (a class
        # without a composite: the composite's own handler wants them all).
        plain = Parent.__mapper__.class_manager
        plain.dispatch.load(plain.state_getter()(Parent(id=8)))
        plain.dispatch.refresh(plain.state_getter()(Parent(id=8)))
        manager.dispatch.refresh(state, object(), None)
        manager.dispatch.refresh(state, "not a context", ["x1"])
        with Session(engine) as session:
            loaded = session.get(Segment, 1)
            assert loaded is not None
            return (point, loaded.start)

    assert assert_unchanged(scenario) == ("returned", (Point(3, 4), Point(1, 2)))


def test_joined_collection_under_selectin_post_load():
    """selectinload(...).joinedload(collection): no AssertionError in the post-load."""

    def scenario(engine: Any) -> Any:
        with Session(engine) as session:
            statement = select(Parent).options(
                selectinload(Parent.children).joinedload(Child.toys)
            )
            first = session.scalars(statement).all()
            again = session.scalars(statement).all()  # now from the identity map
            return [
                (p.id, [(c.id, sorted(t.id for t in c.toys)) for c in p.children])
                for p in [*first, *again]
            ]

    assert_unchanged(scenario)


def test_a_first_read_and_its_post_loads_verify_nothing():
    """
    A new session's first read, with a selectin post-load and a joined load
    under it: every object it hands back was loaded by it or by its post-load
    moments ago, so nothing is verified (no SELECT of the guard's own).
    """
    engine = _engine()
    guard = install_guard(engine, sample_rate=1.0)
    try:
        with Session(engine) as session:
            parents = session.scalars(
                select(Parent)
                .order_by(Parent.id)
                .options(selectinload(Parent.children).joinedload(Child.toys))
            ).all()
            assert [len(p.children) for p in parents] == [2, 0]
            stats = guard.stats()
            assert (stats.identity_map_hits, stats.verified_objects) == (0, 0)
    finally:
        guard.uninstall()
        engine.dispose()


def test_joined_collection_still_demands_unique():
    """A joined eager collection still makes the result demand unique()."""

    def scenario(engine: Any) -> Any:
        with Session(engine) as session:
            statement = select(Parent).options(joinedload(Parent.children))
            session.scalars(statement).unique().all()
            return session.execute(statement).all()

    outcome = assert_unchanged(scenario)
    assert outcome[0] == "raised" and "unique()" in outcome[2]


def test_core_select_through_a_session_keeps_its_cursor_result():
    """A Core select through a session is still a CursorResult with rowcount."""

    def scenario(engine: Any) -> Any:
        with Session(engine) as session:
            result = session.execute(select(Parent.__table__))
            return (type(result).__name__, result.rowcount, len(result.all()))

    assert assert_unchanged(scenario)[1][0] == "CursorResult"


def test_orm_result_keeps_its_type_and_laziness():
    """An ORM result is SQLAlchemy's own object: same type, yield_per, close()."""

    def scenario(engine: Any) -> Any:
        with Session(engine) as session:
            session.scalars(select(Parent)).all()  # fill the map: hits below
            result = session.execute(select(Parent).execution_options(yield_per=1))
            kind = type(result).__name__
            first = result.fetchone()
            assert first is not None
            after_close = session.execute(select(Parent))
        rows = after_close.all()  # read after the session closed
        return (kind, result._yield_per, first[0].id, len(rows))

    assert_unchanged(scenario)


def test_yield_per_set_by_a_later_listener_is_honoured():
    """A do_orm_execute listener added after the guard can still set yield_per."""

    def scenario(engine: Any) -> Any:
        def stream(orm_state: Any) -> None:
            orm_state.update_execution_options(yield_per=1)

        event.listen(Session, "do_orm_execute", stream)
        try:
            with Session(engine) as session:
                result = session.scalars(select(Parent).order_by(Parent.id))
                return (result._real_result._yield_per, [p.id for p in result])
        finally:
            event.remove(Session, "do_orm_execute", stream)

    assert assert_unchanged(scenario) == ("returned", (1, [1, 2]))


def test_scalar_entities_with_none_and_column_only_reads():
    """
    An outer-joined entity read as scalars holds None for the rows without
    one; a column-only read holds no objects at all. Both come back as they
    would without a guard, and the object the first one serves from the map
    is still checked.
    """

    def scenario(engine: Any) -> Any:
        with Session(engine, expire_on_commit=False) as session:
            held = session.get(Child, 1)
            session.commit()
            children = session.scalars(
                select(Child)
                .select_from(Parent)
                .outerjoin(Parent.children)
                .order_by(Parent.id, Child.id)
            ).all()
            ids = session.scalars(select(Parent.id).order_by(Parent.id)).all()
            return ([c.id if c else None for c in children], children[0] is held, ids)

    expected = ("returned", ([1, 2, None], True, [1, 2]))
    assert assert_unchanged(scenario) == expected
    guard = install_guard(None, sample_rate=1.0)
    try:
        assert _outcome(scenario) == expected
        stats = guard.stats()
    finally:
        guard.uninstall()
    assert (stats.identity_map_hits, stats.verified_objects) == (1, 1)
    assert stats.internal_errors == 0


def test_get_bind_override_without_kwargs():
    """A get_bind(self, mapper=None, clause=None) override keeps working."""

    def scenario(engine: Any) -> Any:
        class NarrowSession(Session):
            def get_bind(self, mapper=None, clause=None):  # type: ignore[override]
                return engine

        with NarrowSession() as session:
            session.scalars(select(Parent)).all()
            return [p.data for p in session.scalars(select(Parent).order_by(Parent.id))]

    assert assert_unchanged(scenario) == ("returned", ["p1", "p2"])


def test_lead_statement_options_do_not_reach_post_loads():
    """autoflush=False on the lead statement does not reach its selectin post-load."""

    def scenario(engine: Any) -> Any:
        with Session(engine) as session:
            session.add(Child(id=7, parent_id=2))  # pending: the post-load flushes it
            statement = (
                select(Parent)
                .where(Parent.id == 2)
                .options(selectinload(Parent.children))
                .execution_options(autoflush=False)
            )
            [loaded] = session.scalars(statement).all()
            return [c.id for c in loaded.children]

    assert assert_unchanged(scenario) == ("returned", [7])


def test_partial_primary_key_is_not_reported_deleted():
    """An identity with a NULL part is skipped and counted, never 'deleted'."""
    engine = _engine()
    guard = install_guard(engine, on_stale="raise")
    with Session(engine) as session:
        first = session.scalars(select(Badged).order_by(Badged.person_id)).all()
        assert [(b.person_id, b.badge_id) for b in first] == [(1, 1), (2, None)]
        again = session.scalars(select(Badged).order_by(Badged.person_id)).all()
        assert again == first  # identity-map hits, the NULL-keyed one included
    stats = guard.stats()
    assert guard.findings == []
    assert stats.verified_objects == 1
    assert stats.skipped_checks == 1
    engine.dispose()


@pytest.mark.parametrize(
    ("write", "kind"),
    [
        (
            lambda s: s.execute(
                lambda_stmt(lambda: update(Parent).values(data="x")),
                execution_options={"synchronize_session": False},
            ),
            "orm_update",
        ),
        (
            lambda s: s.scalars(
                select(Parent).from_statement(
                    update(Parent).values(data="x").returning(Parent)
                )
            ).all(),
            "from_statement",
        ),
        (
            lambda s: s.execute(
                update(Parent).values(data="x").returning(Parent.id),
                execution_options={"synchronize_session": False},
            ).all(),
            "orm_update",
        ),
        (
            lambda s: s.connection().exec_driver_sql(
                "UPDATE compat_parent SET data = 'x'"
            ),
            "driver_sql",
        ),
        (
            lambda s: s.execute(text("-- why\nUPDATE compat_parent SET data = 'x'")),
            "text",
        ),
        (
            lambda s: s.execute(
                text("/* why */ DELETE FROM compat_parent WHERE id = 2")
            ),
            "text",
        ),
        (
            lambda s: s.execute(
                text(
                    "WITH two AS (SELECT 2 AS id) "
                    "UPDATE compat_parent SET data = 'x' WHERE id IN (SELECT id FROM two)"
                )
            ),
            "text",
        ),
    ],
    ids=[
        "lambda",
        "from_statement",
        "returning",
        "exec_driver_sql",
        "text_line_comment",
        "text_block_comment",
        "text_cte",
    ],
)
def test_writes_of_every_form_bypassing_the_session(write, kind):
    """Every form of unsynchronised write is seen, with no internal error."""

    def scenario(engine: Any) -> Any:
        with Session(engine) as session:
            parents = session.scalars(select(Parent).order_by(Parent.id)).all()
            write(session)
            # The bug: the map still holds what the write changed.
            stale = [p.data for p in parents]
            session.rollback()
            return stale

    baseline = assert_unchanged(scenario)
    assert baseline[0] == "returned" and baseline[1] == ["p1", "p2"]

    engine = _engine()
    guard = install_guard(engine)
    scenario(engine)
    [finding] = guard.findings
    assert (finding.kind, finding.statement, finding.table) == (
        "unsynchronized_write",
        kind,
        "compat_parent",
    )
    assert guard.stats().internal_errors == 0
    engine.dispose()


def test_text_reads_are_not_writes():
    """A SELECT that merely mentions 'update' in a string is not a write."""
    engine = _engine()
    guard = install_guard(engine)
    with Session(engine) as session:
        session.scalars(select(Parent)).all()
        session.execute(text("SELECT 'update compat_parent set' AS note"))
        session.execute(
            text("WITH x AS (SELECT 'delete from compat_parent' AS s) SELECT s FROM x")
        )
    assert guard.findings == []
    engine.dispose()


def test_installed_tells_the_truth_when_listeners_are_cleared():
    """Listeners removed behind the guard's back: installed is False, reinstall works."""
    engine = _engine()
    guard = install_guard(None, on_stale="raise")
    assert guard.installed
    SessionEvents._clear()  # what SQLAlchemy's own test fixtures do between tests
    assert not guard.installed

    again = install_guard(None, on_stale="raise")
    assert again is not guard and again.installed
    assert not guard.installed
    with Session(engine, expire_on_commit=False) as session:
        parent = session.get(Parent, 1)
        session.commit()
        with engine.begin() as connection:
            connection.execute(update(Parent).values(data="changed"))
        with pytest.raises(StaleReadError):
            session.scalars(select(Parent).where(Parent.id == 1)).one()
        assert parent.data == "p1"
    again.uninstall()
    engine.dispose()


def test_sharded_selectin_post_loads_reach_every_shard():
    """Horizontal sharding: a selectin post-load still queries every shard."""
    from sqlalchemy.ext.horizontal_shard import ShardedSession

    def scenario(_engine: Any) -> Any:
        shards = {name: _engine_for_shard(name) for name in ("east", "west")}
        try:
            session = ShardedSession(
                shards=shards,
                shard_chooser=lambda mapper, instance, clause=None: "east",
                identity_chooser=lambda *args, **kw: ["east", "west"],
                execute_chooser=lambda context: ["east", "west"],
            )
            with session:
                statement = select(Parent).options(selectinload(Parent.children))
                first = session.scalars(statement).all()
                again = session.scalars(statement).all()
                return sorted(
                    (p.data, sorted(c.id for c in p.children)) for p in [*first, *again]
                )
        finally:
            for engine in shards.values():
                engine.dispose()

    outcome = assert_unchanged(scenario)
    assert outcome == (
        "returned",
        [("east", [10, 11]), ("east", [10, 11]), ("west", [20]), ("west", [20])],
    )


def _engine_for_shard(name: str) -> Any:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    CompatBase.metadata.create_all(engine)
    ids = {"east": (1, [10, 11]), "west": (2, [20])}[name]
    with Session(engine) as session:
        session.add(
            Parent(id=ids[0], data=name, children=[Child(id=i) for i in ids[1]])
        )
        session.commit()
    return engine


def test_internal_errors_are_counted_every_time_and_logged_once():
    """A hook failing on every statement: counted each time, one log line per kind."""
    from structlog.testing import capture_logs

    engine = _engine()
    guard = install_guard(engine)

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("broken on purpose")

    guard._check = broken  # type: ignore[method-assign]
    with capture_logs() as logs, Session(engine) as session:
        held = session.scalars(select(Parent)).all()  # the map holds objects weakly
        for _ in range(3):
            parents = session.scalars(select(Parent).order_by(Parent.id)).all()
            assert [p.data for p in parents] == ["p1", "p2"]
        assert len(held) == 2
    errors = [e for e in logs if e["event"] == "internal_error"]
    assert guard.stats().internal_errors == 3
    assert [(e["where"], e["error"]) for e in errors] == [
        ("statement_hits", "RuntimeError: broken on purpose")
    ]
    engine.dispose()


def test_wrapped_session_methods_keep_their_name_doc_and_signature():
    """The Session methods a guard wraps look the same to whoever inspects them."""
    import inspect

    from sqlalchemy import create_engine

    names = ("_execute_internal", "_flush", "connection", "_identity_lookup")

    def described() -> dict[str, tuple[str, str | None, str]]:
        return {
            name: (
                getattr(Session, name).__name__,
                getattr(Session, name).__doc__,
                str(inspect.signature(getattr(Session, name))),
            )
            for name in names
        }

    originals = {name: Session.__dict__[name] for name in names}
    before = described()
    guard = install_guard(create_engine("sqlite://"))
    try:
        assert any(Session.__dict__[name] is not originals[name] for name in names)
        assert described() == before
    finally:
        guard.uninstall()
    assert {name: Session.__dict__[name] for name in names} == originals
