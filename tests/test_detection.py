"""
Stale-read detection, read path by read path, on SQLite and PostgreSQL.

Every scenario first shows the bug (the stale value really reaches user code),
then what the guard reports. Objects are always held by a local name: the
identity map is weak, and an object nobody holds is simply loaded fresh.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
import sqlalchemy
import structlog
from sqlalchemy import (
    CHAR,
    JSON,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    LargeBinary,
    Numeric,
    String,
    TypeDecorator,
    Uuid,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    column_property,
    contains_eager,
    defaultload,
    defer,
    joinedload,
    lazyload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
)

import sessionguard
from sessionguard import (
    Guard,
    StaleRead,
    StaleReadError,
    UnsynchronizedWrite,
    install_guard,
)
from sessionguard._stale import VERIFICATION_OPTION

from .models import Address, User

if TYPE_CHECKING:
    from collections.abc import Iterator

# -- helpers ---------------------------------------------------------------------------


def _commit_elsewhere(db: Any, *statements: Any) -> None:
    """Run *statements* on a second engine (its own connection) and commit."""
    writer = db.engine()
    with writer.begin() as connection:
        for statement in statements:
            connection.execute(statement)


def _insert_users(db: Any, count: int, *, with_addresses: bool = False) -> None:
    """Users 1..count named user-N (and address N each), committed elsewhere."""
    users = [{"id": n, "name": f"user-{n}"} for n in range(1, count + 1)]
    statements: list[Any] = [insert(User).values(users)]
    if with_addresses:
        addresses = [
            {"id": n, "street": f"{n} Old St", "user_id": n}
            for n in range(1, count + 1)
        ]
        statements.append(insert(Address).values(addresses))
    _commit_elsewhere(db, *statements)


def _stale(guard: Guard) -> list[StaleRead]:
    return [f for f in guard.findings if isinstance(f, StaleRead)]


def _unsynchronized(guard: Guard) -> list[UnsynchronizedWrite]:
    return [f for f in guard.findings if isinstance(f, UnsynchronizedWrite)]


def _names(finding: StaleRead) -> list[str]:
    return [diff.name for diff in finding.attributes]


class _Sql(str):
    """A statement sent to the driver, and whether it was the guard's check."""

    check: bool = False


@contextmanager
def _sql_log(engine: Any) -> Iterator[list[_Sql]]:
    """Every statement the engine sends to the driver while the block runs."""
    statements: list[_Sql] = []

    def record(
        _conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, *_: Any
    ) -> None:
        logged = _Sql(statement)
        options = getattr(context, "execution_options", None) or {}
        logged.check = bool(options.get(VERIFICATION_OPTION))
        statements.append(logged)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _check_queries(statements: list[_Sql]) -> list[_Sql]:
    """The guard's batched ``SELECT ... WHERE pk IN (...)`` (or ``pk = ?``)."""
    return [
        s for s in statements if s.check and s.lstrip().upper().startswith("SELECT")
    ]


# -- extra mapped classes, with their own tables ---------------------------------------


class ExtraBase(DeclarativeBase):
    pass


class Mood(enum.Enum):
    HAPPY = "happy"
    GRUMPY = "grumpy"


class PointType(TypeDecorator[tuple[int, int]]):
    """Stored as ``"x,y"``; the ORM and Core both hand back a tuple."""

    impl = String(40)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else f"{value[0]},{value[1]}"

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else tuple(int(p) for p in value.split(","))


class Typed(ExtraBase):
    __tablename__ = "sgd_typed"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    point: Mapped[tuple[int, int]] = mapped_column(PointType)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    amount: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))
    happened_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    mood: Mapped[Mood] = mapped_column(Enum(Mood))
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    reference: Mapped[uuid.UUID] = mapped_column(Uuid)


TYPED_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")
# RFC 4122 UUIDs only: MariaDB's native UUID type rejects others.
TYPED_VALUES: dict[str, Any] = {
    "point": (1, 2),
    "document": {"a": [1, 2, {"b": None}], "c": "d"},
    "amount": decimal.Decimal("12.50"),
    "happened_at": datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc),
    "mood": Mood.HAPPY,
    "blob": b"\x00\x01binary\xff",
    "reference": uuid.UUID("87654321-4321-4765-8321-876543218765"),
}
TYPED_CHANGES: dict[str, Any] = {
    "point": (1, 3),
    "document": {"a": [1, 2, {"b": 0}], "c": "d"},
    "amount": decimal.Decimal("12.51"),
    "happened_at": datetime.datetime(2024, 5, 1, 12, 31, tzinfo=datetime.timezone.utc),
    "mood": Mood.GRUMPY,
    "blob": b"\x00\x01binary\xfe",
    "reference": uuid.UUID("87654321-4321-4765-8321-876543218766"),
}


class Membership(ExtraBase):
    __tablename__ = "sgd_memberships"

    org_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    member_key: Mapped[str] = mapped_column(String(20), primary_key=True)
    role: Mapped[str] = mapped_column(String(20))


class Employee(ExtraBase):
    __tablename__ = "sgd_employees"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "employee",
    }


class Engineer(Employee):
    __tablename__ = "sgd_engineers"

    id: Mapped[int] = mapped_column(ForeignKey("sgd_employees.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20))
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "engineer"}


class Vehicle(ExtraBase):
    __tablename__ = "sgd_vehicles"

    id: Mapped[int] = mapped_column(primary_key=True)
    type: Mapped[str] = mapped_column(String(20))
    wheels: Mapped[int] = mapped_column(Integer)
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "type",
        "polymorphic_identity": "vehicle",
    }


class Car(Vehicle):
    doors: Mapped[int | None] = mapped_column(Integer, nullable=True)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "car"}


class Truck(Vehicle):
    payload: Mapped[int | None] = mapped_column(Integer, nullable=True)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "truck"}


class Badge(ExtraBase):
    __tablename__ = "sgd_badges"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(20))
    shout: Mapped[str] = column_property(func.upper(label))


@pytest.fixture
def extra(db: Any) -> Iterator[Any]:
    """The test database with this file's extra tables created empty."""
    setup = db.engine()
    ExtraBase.metadata.drop_all(setup)
    ExtraBase.metadata.create_all(setup)
    yield db
    for engine in db.engines:
        getattr(engine, "sync_engine", engine).dispose()
    ExtraBase.metadata.drop_all(setup)


# -- 1. read paths ---------------------------------------------------------------------


def test_select_scalars_returns_stale_object_and_reports_it(db, seed):
    """An ORM select() through scalars() that returns a stale User is reported."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.scalars(select(User)).one()
        session.commit()
        _commit_elsewhere(db, update(User).values(name="bob"))

        again = session.scalars(select(User).where(User.id == 1)).one()
        assert again is user
        assert again.name == "alice"  # the bug: the old name reaches user code

        [finding] = _stale(guard)
        assert (finding.entity, finding.identity, finding.deleted) == (
            "User",
            (1,),
            False,
        )
        assert _names(finding) == ["name"]
        assert finding.location is not None
        assert finding.location.startswith(__file__)


def test_execute_rows_return_stale_object_and_report_it(db, seed):
    """An ORM select() through execute() rows that hold a stale User is reported."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        session.commit()
        _commit_elsewhere(db, update(User).values(email="new@example.com"))

        [(again,)] = session.execute(select(User)).all()
        assert again is user
        assert again.email is None  # the bug

        [finding] = _stale(guard)
        assert _names(finding) == ["email"]


def test_get_returns_stale_object_and_reports_it(db, seed):
    """Session.get() answered from the identity map without SQL is checked."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.scalars(select(User)).one()
        session.commit()
        _commit_elsewhere(db, update(User).values(name="bob"))

        assert session.get(User, 1).name == "alice"  # the bug

        [finding] = _stale(guard)
        assert (finding.entity, finding.identity, _names(finding)) == (
            "User",
            (1,),
            ["name"],
        )
        assert user.name == "alice"
        assert not session.in_transaction()  # the check began no transaction


def test_get_of_an_expired_object_reloads_it_and_is_no_hit(db, seed):
    """get() of an expired object reloads it in full: nothing served, nothing checked."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine) as session:  # expire_on_commit=True
        user = session.get(User, 1)
        session.commit()  # expires user
        _commit_elsewhere(db, update(User).values(name="bob"))
        with _sql_log(engine) as statements:
            assert session.get(User, 1) is user
        assert user.name == "bob"  # reloaded by the lookup
        assert [sql.check for sql in statements] == [False]  # the reload only
        stats = guard.stats()
        assert (stats.identity_map_hits, stats.verified_objects) == (0, 0)
        assert guard.findings == []


def test_get_of_a_partly_expired_object_checks_what_it_holds(db, seed):
    """
    get() of an object with one attribute expired reloads nothing: the object
    is served from the map and its loaded attributes are checked.
    """
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        session.commit()
        session.expire(user, ["email"])
        _commit_elsewhere(db, update(User).values(name="bob", email="b@x.org"))
        assert session.get(User, 1).name == "alice"  # the bug
        [finding] = _stale(guard)
        assert _names(finding) == ["name"]  # email was not held: not compared
        assert user.email == "b@x.org"  # loaded now, on access


def test_rows_fetched_after_the_map_filled_are_checked(db, seed):
    """
    A read whose statement ran while the map was empty, but whose rows are
    fetched after another read filled it: the object it then gets from the map
    is checked (the empty-map shortcut is taken per chunk, at fetch time).
    """
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine) as session:
        result = session.execute(select(User).where(User.id == 1))  # map empty
        user = session.get(User, 1)  # a SELECT of its own fills the map
        assert guard.stats().identity_map_hits == 0
        [again] = result.scalars().all()
        assert again is user
        stats = guard.stats()
        assert (stats.identity_map_hits, stats.verified_objects) == (1, 1)
        assert guard.findings == []


def test_get_one_returns_stale_object_and_reports_it(db, seed):
    """Session.get_one() answered from the identity map is checked."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        session.commit()
        _commit_elsewhere(db, update(User).values(name="bob"))

        assert session.get_one(User, 1).name == "alice"  # the bug

        [finding] = _stale(guard)
        assert _names(finding) == ["name"]
        assert user is session.get_one(User, 1)


def test_many_to_one_lazy_load_from_identity_map_is_checked(db, seed):
    """A many-to-one lazy load answered from the identity map reports the stale User."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        address = session.get(Address, 1)
        assert "user" not in address.__dict__
        session.commit()
        _commit_elsewhere(db, update(User).values(name="bob"))

        with _sql_log(engine) as statements:
            related = address.user
        assert related is user
        assert related.name == "alice"  # the bug
        assert not [s for s in statements if "sg_users" in s and not s.check]

        [finding] = _stale(guard)
        assert (finding.entity, _names(finding)) == ("User", ["name"])


def test_collection_lazy_load_reports_stale_member(db, seed):
    """A collection lazy load that returns an Address already in the map is checked."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        address = session.get(Address, 1)
        assert "addresses" not in user.__dict__
        session.commit()
        _commit_elsewhere(db, update(Address).values(street="2 New St"))

        assert user.addresses == [address]
        assert user.addresses[0].street == "1 Main St"  # the bug

        [finding] = _stale(guard)
        assert (finding.entity, finding.identity, _names(finding)) == (
            "Address",
            (1,),
            ["street"],
        )


@pytest.mark.parametrize("loader", [selectinload, subqueryload])
def test_separate_eager_loaders_report_stale_related_object(db, seed, loader):
    """selectinload/subqueryload returning an Address already in the map is checked."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        address = session.get(Address, 1)
        session.commit()
        _commit_elsewhere(db, update(Address).values(street="2 New St"))

        loaded = session.scalars(select(User).options(loader(User.addresses))).one()
        assert loaded is user
        assert "addresses" in user.__dict__  # the eager loader really ran
        assert user.addresses == [address]
        assert address.street == "1 Main St"  # the bug

        [finding] = _stale(guard)
        assert (finding.entity, finding.identity, _names(finding)) == (
            "Address",
            (1,),
            ["street"],
        )


def test_joinedload_related_collection_member_in_map_is_checked(db, seed):
    """A joinedload-ed Address that was already in the map is checked and reported."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        address = session.get(Address, 1)
        session.commit()
        _commit_elsewhere(
            db,
            update(Address).values(street="2 New St"),
            update(User).values(name="bob"),
        )

        statement = select(User).options(joinedload(User.addresses))
        loaded = session.scalars(statement).unique().one()
        assert loaded is user
        assert user.addresses == [address]
        assert address.street == "1 Main St"  # the bug: stale street returned
        assert user.name == "alice"

        # Both the top-level User and the Address that the joined eager load
        # handed back through user.addresses are reported.
        assert sorted((f.entity, _names(f)) for f in _stale(guard)) == [
            ("Address", ["street"]),
            ("User", ["name"]),
        ]


def test_contains_eager_related_object_in_map_is_checked(db, seed):
    """An Address that contains_eager() populates from the map is checked."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        address = session.get(Address, 1)
        session.commit()
        _commit_elsewhere(db, update(Address).values(street="2 New St"))

        statement = (
            select(User)
            .join(User.addresses)
            .options(contains_eager(User.addresses))
            .where(Address.street == "2 New St")  # the row matches as it is now
        )
        user = session.scalars(statement).unique().one()  # the User is new
        assert user.addresses == [address]
        assert address.street == "1 Main St"  # the bug: stale street returned
        assert [(f.entity, _names(f)) for f in _stale(guard)] == [
            ("Address", ["street"])
        ]
        assert guard.stats().verified_objects == 1


def test_joinedload_is_not_undone_by_a_later_defaultload_of_the_same_path(db, seed):
    """``joinedload(U.a), defaultload(U.a).joinedload(...)``: U.a is still joined."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        address = session.get(Address, 1)
        session.commit()
        _commit_elsewhere(db, update(Address).values(street="2 New St"))
        statement = select(User).options(
            joinedload(User.addresses),
            defaultload(User.addresses).joinedload(Address.user),
        )
        user = session.scalars(statement).unique().one()
        assert user.addresses == [address]
        assert address.street == "1 Main St"  # the bug: stale street returned
        assert [(f.entity, _names(f)) for f in _stale(guard)] == [
            ("Address", ["street"])
        ]


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)  # a client-side cursor
def test_yield_per_object_reloaded_in_one_chunk_is_no_hit_in_the_next(db, seed):
    """
    yield_per: an expired object reloaded by the first chunk and repeated in
    the second was reloaded by this statement, not served from the map.
    """
    seed(db)
    with Session(db.engine()) as setup:
        setup.add(Address(id=2, street="2 Side St", user_id=1))
        setup.commit()
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine) as session:
        held = session.scalars(select(Address)).all(), session.get(User, 1)
        session.expire_all()
        statement = (
            select(Address, User)
            .join(Address.user)
            .order_by(Address.id)
            .execution_options(yield_per=1)
        )
        rows = session.execute(statement).all()
        assert [row[1] for row in rows] == [held[1], held[1]]
        stats = guard.stats()
        assert (stats.identity_map_hits, stats.verified_objects) == (0, 0)


def test_joinedload_related_many_to_one_in_map_is_checked(db, seed):
    """A joinedload-ed many-to-one User that was already in the map is reported."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        address = session.get(Address, 1)
        session.commit()
        _commit_elsewhere(db, update(User).values(name="bob"))

        statement = select(Address).options(joinedload(Address.user))
        assert session.scalars(statement).one() is address
        assert address.user is user
        assert user.name == "alice"  # the bug: stale name returned

        # The Address itself is unchanged; the User it joined-loaded is stale.
        assert [(f.entity, _names(f)) for f in _stale(guard)] == [("User", ["name"])]
        assert guard.stats().verified_objects == 2


# -- 2. deleted rows, batching ---------------------------------------------------------


def test_deleted_row_is_reported_as_deleted(db, seed):
    """An object whose row was deleted elsewhere is reported with deleted=True."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        address = session.get(Address, 1)
        session.commit()
        _commit_elsewhere(db, delete(Address))

        again = session.get(Address, 1)
        assert again is address
        assert again.street == "1 Main St"  # the bug: a row that no longer exists

        [finding] = _stale(guard)
        assert (finding.entity, finding.identity, finding.deleted) == (
            "Address",
            (1,),
            True,
        )
        assert finding.attributes == ()


def test_many_stale_objects_are_checked_with_one_query_per_mapper(db):
    """Three stale Users and three stale Addresses: two check queries, six findings."""
    _insert_users(db, 3, with_addresses=True)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        rows = session.execute(select(User, Address).join(User.addresses)).all()
        held = [obj for row in rows for obj in row]
        session.commit()
        _commit_elsewhere(
            db,
            update(User).values(name=User.name + "-renamed"),
            update(Address).values(street="gone"),
        )

        with _sql_log(engine) as statements:
            again = session.execute(
                select(User, Address).join(User.addresses).order_by(User.id)
            ).all()
        assert {id(obj) for row in again for obj in row} == {id(obj) for obj in held}
        assert [row[0].name for row in again] == ["user-1", "user-2", "user-3"]

        checks = _check_queries(statements)
        assert len(checks) == 2
        assert sum("sg_users" in s.split("WHERE")[0] for s in checks) == 1
        assert sum("sg_addresses" in s.split("WHERE")[0] for s in checks) == 1

        found = sorted((f.entity, f.identity) for f in _stale(guard))
        assert found == [
            ("Address", (1,)),
            ("Address", (2,)),
            ("Address", (3,)),
            ("User", (1,)),
            ("User", (2,)),
            ("User", (3,)),
        ]
        assert guard.stats().stale_reads == 6


# -- 3. never cry wolf -----------------------------------------------------------------


def test_no_finding_when_nothing_changed(db, seed):
    """select(), get() and lazy loads of unchanged rows are checked and not reported."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        address = session.get(Address, 1)
        session.commit()

        assert session.scalars(select(User)).one() is user
        assert session.get(User, 1) is user
        assert address.user is user
        assert user.addresses == [address]

        assert _stale(guard) == []
        assert guard.stats().verified_objects >= 4  # the checks really ran


def test_attribute_with_pending_change_is_skipped(db, seed):
    """A modified, unflushed attribute is not compared; its unmodified sibling is."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        session.commit()
        _commit_elsewhere(db, update(User).values(name="bob", email="new@example.com"))

        user.name = "mine"
        with session.no_autoflush:
            again = session.scalars(select(User)).one()
        assert again.name == "mine"  # the user's own pending change
        assert again.email is None  # the bug, on the unmodified attribute

        [finding] = _stale(guard)
        assert _names(finding) == ["email"]
        session.rollback()


def test_attribute_assigned_its_own_value_is_compared(db, seed):
    """Assigning the value an attribute already had is no pending change: compared."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        session.commit()
        _commit_elsewhere(db, update(User).values(name="bob"))

        user.name = "alice"
        assert not session.is_modified(user)
        again = session.scalars(select(User)).one()
        assert again.name == "alice"  # the bug: and a flush would not write it

        [finding] = _stale(guard)
        assert _names(finding) == ["name"]


def test_deferred_attribute_is_not_compared(db, seed):
    """An attribute that was never loaded (defer) is not compared."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.scalars(select(User).options(defer(User.email))).one()
        session.commit()
        _commit_elsewhere(db, update(User).values(email="new@example.com"))

        again = session.scalars(select(User).options(defer(User.email))).one()
        assert again is user
        assert "email" not in user.__dict__  # nothing cached, so nothing stale

        assert _stale(guard) == []
        assert guard.stats().verified_objects == 1  # name etc. were compared
        assert user.email == "new@example.com"


def test_sql_expression_column_property_is_not_compared(extra):
    """A SQL-expression column_property is not compared; only the stored column is."""
    _commit_elsewhere(extra, insert(Badge).values(id=1, label="gold"))
    engine = extra.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        badge = session.get(Badge, 1)
        assert badge.shout == "GOLD"
        session.commit()
        _commit_elsewhere(extra, update(Badge).values(label="silver"))

        again = session.scalars(select(Badge)).one()
        assert (again.label, again.shout) == ("gold", "GOLD")  # the bug

        [finding] = _stale(guard)
        assert _names(finding) == ["label"]


def test_populate_existing_is_not_checked(db, seed):
    """A populate_existing statement overwrites what it finds: nothing to check."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        session.commit()
        _commit_elsewhere(db, update(User).values(name="bob"))

        with _sql_log(engine) as statements:
            query = select(User).execution_options(populate_existing=True)
            again = session.scalars(query).one()
        assert again is user
        assert user.name == "bob"  # read fresh

        assert _check_queries(statements) == []
        assert _stale(guard) == []
        assert guard.stats().identity_map_hits == 0


@pytest.mark.parametrize("options", [{"yield_per": 1}, {"yield_per": 10}])
def test_yield_per_chunks_are_checked(db, seed, options):
    """
    yield_per on a client-side cursor (SQLite): each chunk is checked as it is
    fetched. Where yield_per streams from a server-side cursor (PostgreSQL),
    the connection is busy with it: not checked.
    """
    seed(db)
    engine = db.engine()
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        session.commit()
        _commit_elsewhere(db, update(User).values(name="bob"))
        again = session.scalars(select(User).execution_options(**options)).one()
        assert again is user and again.name == "alice"  # the bug, unguarded

    _commit_elsewhere(db, update(User).values(name="alice"))
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        session.commit()
        _commit_elsewhere(db, update(User).values(name="bob"))
        result = session.scalars(select(User).execution_options(**options))
        assert _stale(guard) == []  # nothing fetched, nothing read yet
        again = result.one()
        assert again is user and again.name == "alice"

    if engine.dialect.supports_server_side_cursors:
        assert _stale(guard) == []
        assert guard.stats().identity_map_hits == 0
        return
    [finding] = _stale(guard)
    assert _names(finding) == ["name"]


def test_expire_all_then_read_is_fresh_and_not_reported(db, seed):
    """After expire_all() a read reloads the row: fresh value, no finding."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        session.commit()
        _commit_elsewhere(db, update(User).values(name="bob"))

        session.expire_all()
        again = session.scalars(select(User)).one()
        assert again is user
        assert user.name == "bob"
        _commit_elsewhere(db, update(User).values(name="carol"))
        session.expire_all()
        assert session.get(User, 1).name == "carol"

        assert _stale(guard) == []


# -- 4. isolation levels on PostgreSQL and MariaDB ---------------------------------------


@pytest.mark.parametrize("db", ["postgresql", "mariadb"], indirect=True)
def test_read_committed_reports_row_committed_after_load(db, seed):
    """READ COMMITTED: a row committed elsewhere mid-transaction is reported."""
    seed(db)
    engine = db.engine(isolation_level="READ COMMITTED")
    with Session(engine) as session:  # first, the bug without a guard
        user = session.get(User, 1)
        _commit_elsewhere(db, update(User).values(name="bob"))
        fresh = select(User).execution_options(populate_existing=True)
        assert session.scalars(select(User)).one().name == "alice"
        assert session.scalars(fresh).one().name == "bob"  # what the row says
    _commit_elsewhere(db, update(User).values(name="alice"))

    guard = install_guard(engine)
    with Session(engine) as session:
        assert session.connection().get_isolation_level() == "READ COMMITTED"
        user = session.get(User, 1)
        _commit_elsewhere(db, update(User).values(name="bob"))

        assert session.scalars(select(User)).one().name == "alice"  # the bug
        assert session.in_transaction()

        [finding] = _stale(guard)
        assert _names(finding) == ["name"]
        assert user.name == "alice"


# MariaDB's SERIALIZABLE makes plain reads take shared locks: the other writer
# would wait for the session to end, so there is nothing to see mid-transaction.
@pytest.mark.parametrize(
    ("db", "isolation_level"),
    [
        ("postgresql", "REPEATABLE READ"),
        ("postgresql", "SERIALIZABLE"),
        ("mariadb", "REPEATABLE READ"),
    ],
    indirect=["db"],
)
def test_snapshot_isolation_reports_nothing(db, seed, isolation_level):
    """REPEATABLE READ / SERIALIZABLE: the snapshot is the truth, nothing reported."""
    seed(db)
    engine = db.engine(isolation_level=isolation_level)
    guard = install_guard(engine)
    with Session(engine) as session:
        assert session.connection().get_isolation_level() == isolation_level
        user = session.get(User, 1)
        _commit_elsewhere(db, update(User).values(name="bob"))

        assert session.scalars(select(User)).one().name == "alice"
        fresh = select(User).execution_options(populate_existing=True)
        assert session.scalars(fresh).one().name == "alice"  # the snapshot

        assert _stale(guard) == []
        assert guard.stats().verified_objects == 1  # checked, in the snapshot
        session.rollback()
        assert session.scalars(fresh).one().name == "bob"
        assert user.name == "bob"


# -- 5. column types, keys and inheritance ---------------------------------------------


def _utc(value: Any) -> Any:
    """Datetimes as naive UTC: SQLite keeps no offset, PostgreSQL converts it."""
    if isinstance(value, datetime.datetime) and value.tzinfo is not None:
        return value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return value


def _seed_typed(db: Any) -> None:
    _commit_elsewhere(db, insert(Typed).values(id=TYPED_ID, **TYPED_VALUES))


def test_typed_columns_unchanged_give_no_false_positive(extra):
    """TypeDecorator, JSON, Numeric, aware DateTime, Enum, bytes, Uuid: no noise."""
    _seed_typed(extra)
    engine = extra.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        row = session.get(Typed, TYPED_ID)
        assert row.point == (1, 2)
        session.commit()

        assert session.scalars(select(Typed)).one() is row
        assert session.get(Typed, TYPED_ID) is row

        assert _stale(guard) == []
        assert guard.stats().verified_objects == 2
        assert guard.stats().verification_errors == 0


@pytest.mark.parametrize("column", sorted(TYPED_CHANGES))
def test_typed_column_change_is_reported(extra, column):
    """A change to one typed column is reported, naming exactly that column."""
    _seed_typed(extra)
    engine = extra.engine()
    guard = install_guard(engine, log_values=True)
    with Session(engine, expire_on_commit=False) as session:
        row = session.get(Typed, TYPED_ID)
        session.commit()
        _commit_elsewhere(extra, update(Typed).values({column: TYPED_CHANGES[column]}))

        again = session.scalars(select(Typed)).one()
        assert again is row
        assert _utc(getattr(again, column)) == _utc(TYPED_VALUES[column])  # the bug

        [finding] = _stale(guard)
        assert finding.identity == (TYPED_ID,)
        [diff] = finding.attributes
        assert diff.name == column
        assert _utc(diff.current) == _utc(TYPED_CHANGES[column])


def test_composite_primary_key(extra):
    """An object with a composite primary key is found, checked and reported."""
    _commit_elsewhere(
        extra,
        insert(Membership).values(
            [
                {"org_id": 1, "member_key": "a", "role": "reader"},
                {"org_id": 1, "member_key": "b", "role": "reader"},
                {"org_id": 2, "member_key": "a", "role": "reader"},
            ]
        ),
    )
    engine = extra.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        held = session.scalars(select(Membership)).all()
        session.commit()
        assert session.get(Membership, (1, "a")).role == "reader"
        assert _stale(guard) == []

        _commit_elsewhere(
            extra,
            update(Membership)
            .where(Membership.org_id == 1, Membership.member_key == "b")
            .values(role="admin"),
        )
        again = session.scalars(select(Membership)).all()
        assert {m.role for m in again} == {"reader"}  # the bug
        assert len(held) == 3

        [finding] = _stale(guard)
        assert (finding.entity, finding.identity, _names(finding)) == (
            "Membership",
            (1, "b"),
            ["role"],
        )


def test_joined_table_inheritance_polymorphic_select(extra):
    """A base select returning a joined-inheritance subclass checks both tables."""
    _commit_elsewhere(
        extra,
        insert(Employee).values(id=1, kind="engineer", name="ada"),
        text("INSERT INTO sgd_engineers (id, language) VALUES (1, 'python')"),
        insert(Employee).values(id=2, kind="employee", name="bob"),
    )
    engine = extra.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        engineer = session.get(Engineer, 1)
        plain = session.get(Employee, 2)
        session.commit()
        everyone = session.scalars(select(Employee).order_by(Employee.id)).all()
        assert everyone == [engineer, plain]
        assert _stale(guard) == []

        _commit_elsewhere(
            extra,
            update(Employee).where(Employee.id == 1).values(name="grace"),
            text("UPDATE sgd_engineers SET language = 'cobol' WHERE id = 1"),
        )
        again = session.scalars(select(Employee).order_by(Employee.id)).all()
        assert again[0] is engineer
        assert (engineer.name, engineer.language) == ("ada", "python")  # the bug

        [finding] = _stale(guard)
        assert (finding.entity, finding.identity) == ("Engineer", (1,))
        assert sorted(_names(finding)) == ["language", "name"]


def test_subclass_rows_read_into_a_new_map_are_checked(extra):
    """
    A subclass's row processor is made when its first row is read, with the
    session's identity map of that moment: a read run while the map was empty,
    then fetched after expunge_all() and another read filled the new map, still
    checks the subclass object the new map serves.
    """
    _commit_elsewhere(
        extra,
        insert(Employee).values(id=1, kind="engineer", name="ada"),
        text("INSERT INTO sgd_engineers (id, language) VALUES (1, 'python')"),
    )
    engine = extra.engine()
    guard = install_guard(engine)
    with Session(engine) as session:
        result = session.execute(select(Employee).order_by(Employee.id))  # map empty
        session.expunge_all()  # a new map
        engineer = session.get(Engineer, 1)  # in the new map
        [again] = result.scalars().all()
        assert again is engineer
        stats = guard.stats()
        assert (stats.identity_map_hits, stats.verified_objects) == (1, 1)


def test_single_table_inheritance_polymorphic_select(extra):
    """A base-class select returning single-table subclasses reports each stale one."""
    _commit_elsewhere(
        extra,
        insert(Vehicle.__table__).values(
            [
                {"id": 1, "type": "car", "wheels": 4, "doors": 5, "payload": None},
                {"id": 2, "type": "truck", "wheels": 6, "doors": None, "payload": 10},
                {"id": 3, "type": "car", "wheels": 4, "doors": 3, "payload": None},
            ]
        ),
    )
    engine = extra.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        held = session.scalars(select(Vehicle).order_by(Vehicle.id)).all()
        car, truck, coupe = held
        assert (type(car), type(truck)) == (Car, Truck)
        assert (car.doors, truck.payload, coupe.doors) == (5, 10, 3)
        session.commit()
        assert session.scalars(select(Vehicle)).all()
        assert _stale(guard) == []

        _commit_elsewhere(
            extra,
            update(Vehicle).where(Vehicle.id == 1).values(doors=3),
            update(Vehicle).where(Vehicle.id == 2).values(wheels=8),
        )
        again = session.scalars(select(Vehicle).order_by(Vehicle.id)).all()
        assert again == held
        assert (car.doors, truck.wheels) == (5, 6)  # the bug

        found = sorted((f.entity, f.identity, _names(f)) for f in _stale(guard))
        assert found == [("Car", (1,), ["doors"]), ("Truck", (2,), ["wheels"])]


@pytest.mark.parametrize("translated", [False, True])
def test_one_object_check_on_the_driver_cursor_finds_what_the_connection_would(
    extra, monkeypatch, translated
):
    """
    The check of one object runs on the driver's cursor, SQL compiled once (no
    SQLAlchemy execution: no before_cursor_execute for it), with SQLAlchemy's
    own bind and result processing: every typed column's change reads back as
    the value SQLAlchemy would load. With a schema_translate_map, and with the
    raw path turned off, the same check goes through the Connection and finds
    the same.
    """
    from sessionguard import _stale as stale_module

    _seed_typed(extra)

    def changed_values(raw_allowed: bool) -> tuple[list[Any], list[_Sql]]:
        if not raw_allowed:
            monkeypatch.setattr(stale_module, "_RAW_DRIVERS", frozenset())
        # An engine of its own: the compiled form is kept per dialect.
        engine = extra.engine()
        if translated:
            engine = engine.execution_options(schema_translate_map={None: None})
        guard = install_guard(engine, log_values=True)
        try:
            with Session(engine, expire_on_commit=False) as session:
                row = session.get(Typed, TYPED_ID)
                session.commit()
                _commit_elsewhere(extra, update(Typed).values(TYPED_CHANGES))
                session.scalars(select(Typed.id)).all()  # begins the transaction
                with _sql_log(engine) as statements:
                    assert session.get(Typed, TYPED_ID) is row
                    assert row.mood is TYPED_VALUES["mood"]  # the bug, still
                session.rollback()
            [finding] = _stale(guard)
            current = sorted(
                (diff.name, _utc(diff.current)) for diff in finding.attributes
            )
            return current, statements
        finally:
            guard.uninstall()
            _commit_elsewhere(extra, update(Typed).values(TYPED_VALUES))
            monkeypatch.undo()

    expected = sorted((name, _utc(value)) for name, value in TYPED_CHANGES.items())
    raw, raw_statements = changed_values(raw_allowed=True)
    through_connection, statements = changed_values(raw_allowed=False)
    assert raw == through_connection == expected
    assert len(_check_queries(statements)) == 1
    dialect = extra.engine().dialect
    driver = (dialect.name, dialect.driver, dialect.is_async)
    if translated or driver not in stale_module._RAW_DRIVERS:
        assert len(_check_queries(raw_statements)) == 1
    else:
        assert _check_queries(raw_statements) == []


def test_the_compiled_one_object_check_holds_no_dialect(sqlite_db, seed):
    """
    The one-object check compiled for a dialect is kept per dialect, weakly;
    what is kept holds no reference back to the dialect, so the engines a
    process makes and drops do not stay alive through the guard.
    """
    import gc
    import weakref

    from sqlalchemy import create_engine

    from sessionguard import _stale as stale_module

    seed(sqlite_db)
    dialects = []
    for _ in range(3):
        engine = create_engine(sqlite_db.url)
        guard = install_guard(engine)
        with Session(engine, expire_on_commit=False) as session:
            user = session.get(User, 1)
            session.commit()
            session.scalars(select(User.id)).all()
            assert session.get(User, 1) is user  # a hit: checked on the cursor
        assert guard.stats().verified_objects == 1
        compiled = [
            plan.raw.get(engine.dialect)
            for info in list(stale_module._mapper_infos.values())
            for plan in list(info.plans.values())
        ]
        assert any(compiled)  # the check ran on the cursor
        guard.uninstall()
        engine.dispose()
        dialects.append(weakref.ref(engine.dialect))
        del engine, session, user, guard, compiled
    gc.collect()
    assert [ref() for ref in dialects] == [None, None, None]


@pytest.mark.parametrize("db", ["postgresql", "mariadb"], indirect=True)
def test_native_uuid_primary_key(extra):
    """Uuid binds correctly in the check, native (PostgreSQL; MariaDB from
    SQLAlchemy 2.1) or CHAR(32) (MariaDB on SQLAlchemy 2.0)."""
    _seed_typed(extra)
    engine = extra.engine()
    with engine.connect() as connection:
        udt = connection.exec_driver_sql(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_name = 'sgd_typed' AND column_name = 'id'"
            " AND table_schema = current_schema()"
            if extra.name == "postgresql"
            else "SELECT data_type FROM information_schema.columns "
            "WHERE table_name = 'sgd_typed' AND column_name = 'id'"
            " AND table_schema = database()"
        ).scalar()
    native = extra.name == "postgresql" or not sqlalchemy.__version__.startswith("2.0")
    assert udt == ("uuid" if native else "char")
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        row = session.get(Typed, TYPED_ID)
        session.commit()
        _commit_elsewhere(extra, delete(Typed))

        assert session.get(Typed, TYPED_ID) is row  # the bug: the row is gone

        [finding] = _stale(guard)
        assert (finding.identity, finding.deleted) == ((TYPED_ID,), True)
        assert guard.stats().verification_errors == 0


# -- 6. joined eager loading still needs unique() --------------------------------------


def test_joined_eager_unique_error_is_preserved(db, seed):
    """scalars().all() on a joined collection load still raises the unique() error."""
    seed(db)
    engine = db.engine()
    statement = select(User).options(joinedload(User.addresses))
    with Session(engine) as session, pytest.raises(InvalidRequestError) as without:
        session.execute(statement).scalars().all()

    install_guard(engine)
    with Session(engine) as session:
        user = session.get(User, 1)
        with pytest.raises(InvalidRequestError, match="unique") as guarded:
            session.execute(statement).scalars().all()
        assert str(guarded.value) == str(without.value)
        assert session.execute(statement).unique().scalars().all() == [user]


_JOINED_READS = {
    "multi-entity execute().unique()": lambda session: (
        session.execute(
            select(User, Address)
            .join(User.addresses)
            .options(joinedload(User.addresses))
        )
        .unique()
        .all()
    ),
    "column and entity execute().unique()": lambda session: (
        session.execute(select(User.id, User).options(joinedload(User.addresses)))
        .unique()
        .all()
    ),
    "legacy Query uniquing by itself": lambda session: (
        session.query(User, Address)
        .join(User.addresses)
        .options(joinedload(User.addresses))
        .all()
    ),
}


@pytest.mark.parametrize("read", sorted(_JOINED_READS))
def test_joined_eager_reads_that_unique_work_as_without_a_guard(db, seed, read):
    """Reads that call unique() (or need not) return the same rows under a guard."""
    seed(db)
    engine = db.engine()
    with Session(engine) as session:
        without = len(_JOINED_READS[read](session))
    install_guard(engine)
    with Session(engine) as session:
        assert len(_JOINED_READS[read](session)) == without == 1


# -- 7. on_stale modes -----------------------------------------------------------------


def _make_stale(db: Any, session: Session, **values: Any) -> User:
    user = session.get(User, 1)
    session.commit()
    _commit_elsewhere(db, update(User).values(**values))
    return user


def test_on_stale_log_emits_redacted_warning_event(db, seed):
    """on_stale='log': a 'stale_read' warning with the contract's fields, no values."""
    seed(db, email="alice-private@example.com")
    engine = db.engine()
    install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = _make_stale(db, session, name="robert-confidential")
        with structlog.testing.capture_logs() as logs:
            assert session.scalars(select(User)).one().name == "alice"  # the bug

    [entry] = [e for e in logs if e["event"] == "stale_read"]
    assert entry["log_level"] == "warning"
    assert entry["entity"] == "User"
    assert list(entry["identity"]) == [1]
    assert entry["deleted"] is False
    assert entry["attributes"] == [
        {"name": "name", "cached": "<redacted>", "current": "<redacted>"}
    ]
    assert entry["location"].startswith(__file__)
    assert "session_id" in entry
    captured = repr(logs)
    for value in ("alice", "robert-confidential", "alice-private", "hashed"):
        assert value not in captured
    assert user.name == "alice"


def test_on_stale_warn_emits_python_warning(db, seed):
    """on_stale='warn': the stale read also raises a SessionGuardWarning."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine, on_stale="warn")
    with Session(engine, expire_on_commit=False) as session:
        user = _make_stale(db, session, name="bob")
        with pytest.warns(sessionguard.SessionGuardWarning, match=r"User.*name"):
            again = session.scalars(select(User)).one()
        assert again.name == "alice"  # the bug: the read still returns
        assert len(_stale(guard)) == 1
        assert user is again


def test_on_stale_raise_names_entity_identity_attribute_location_and_fix(db, seed):
    """on_stale='raise': StaleReadError at the read, with a message that helps."""
    seed(db)
    engine = db.engine()
    with Session(engine, expire_on_commit=False) as session:
        user = _make_stale(db, session, name="bob")
        assert session.scalars(select(User)).one().name == "alice"  # the bug

        install_guard(engine, on_stale="raise")
        with pytest.raises(StaleReadError) as info:
            session.scalars(select(User)).one()
        with pytest.raises(StaleReadError):
            session.get(User, 1)
    message = str(info.value)
    assert "User" in message
    assert "stale read of User 1 at" in message
    assert "attribute `name` differs from the database row" in message
    assert "name" in message
    assert f"{__file__}:" in message
    assert "expire_all()" in message
    assert "populate_existing" in message
    assert "alice" not in message
    assert info.value.finding.entity == "User"
    assert user.name == "alice"


def test_log_values_shows_values_but_redacts_secret_names(db, seed):
    """log_values=True shows cached/current values; password_hash stays redacted."""
    seed(db)
    engine = db.engine()
    install_guard(engine, log_values=True)
    with Session(engine, expire_on_commit=False) as session:
        user = _make_stale(db, session, name="bob", password_hash="rehashed")
        with structlog.testing.capture_logs() as logs:
            assert session.get(User, 1).name == "alice"  # the bug

    [entry] = [e for e in logs if e["event"] == "stale_read"]
    by_name = {diff["name"]: diff for diff in entry["attributes"]}
    assert by_name["name"] == {"name": "name", "cached": "alice", "current": "bob"}
    assert by_name["password_hash"] == {
        "name": "password_hash",
        "cached": "<redacted>",
        "current": "<redacted>",
    }
    assert "rehashed" not in repr(logs)
    assert user.password_hash == "hashed"


# -- 8. writes that bypass the session -------------------------------------------------


_BYPASSING_WRITES = {
    "text() through the session": (
        "text",
        lambda session: session.execute(text("UPDATE sg_users SET name = 'x'")),
    ),
    "ORM update(), synchronize_session=False": (
        "orm_update",
        lambda session: session.execute(
            update(User).values(name="x").execution_options(synchronize_session=False)
        ),
    ),
    "Core update() on session.connection()": (
        "core",
        lambda session: session.connection().execute(
            update(User.__table__).values(name="x")
        ),
    ),
    "text() on session.connection()": (
        "text",
        lambda session: session.connection().execute(
            text("UPDATE sg_users SET name = 'x'")
        ),
    ),
    "ORM update(User) on session.connection()": (
        "core",
        lambda session: session.connection().execute(update(User).values(name="x")),
    ),
}


@pytest.mark.parametrize("write", sorted(_BYPASSING_WRITES))
def test_write_that_bypasses_the_session_is_reported(db, seed, write):
    """A write the identity map does not hear of, with objects of its table there."""
    kind, run = _BYPASSING_WRITES[write]
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine) as session:
        user = session.get(User, 1)
        run(session)
        assert session.execute(text("SELECT name FROM sg_users")).scalar() == "x"
        assert user.name == "alice"  # the bug: the session does not know

        [finding] = _unsynchronized(guard)
        assert (finding.table, finding.statement, finding.entities) == (
            "sg_users",
            kind,
            ("User",),
        )
        assert finding.objects == 1
        assert finding.location is not None
        assert finding.location.startswith(__file__)


def test_synchronized_orm_update_is_not_reported(db, seed):
    """ORM update() with default synchronize_session or bulk by pk: no finding."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine) as session:
        user = session.get(User, 1)
        session.execute(update(User).values(name="x"))
        assert user.name == "x"
        session.execute(update(User), [{"id": 1, "name": "y"}])
        assert user.name == "y"
        assert session.get(User, 1) is user

        assert guard.findings == []


def test_write_to_table_without_objects_in_map_is_not_reported(db, seed):
    """A text(), ORM or Core write to a table none of whose objects is in the map."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine) as session:
        address = session.get(Address, 1)
        session.execute(text("UPDATE sg_users SET name = 'x'"))
        session.execute(
            update(User).values(name="y").execution_options(synchronize_session=False)
        )
        session.connection().execute(update(User.__table__).values(name="z"))

        assert guard.findings == []
        assert address.street == "1 Main St"


def test_session_own_flush_is_not_reported(db, seed):
    """The session's own flushes (UPDATE, INSERT, DELETE): no unsynchronized_write."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine) as session:
        user = session.get(User, 1)
        address = session.get(Address, 1)
        user.name = "carol"
        session.add(User(id=2, name="dave"))
        session.delete(address)
        session.flush()
        session.commit()
        assert session.get(User, 1) is user

        assert guard.findings == []


# -- 9. Guard.verify -------------------------------------------------------------------


def test_verify_returns_every_stale_object_in_the_map(db):
    """Guard.verify() checks the whole map: one StaleRead per stale object."""
    _insert_users(db, 3, with_addresses=True)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        users = session.scalars(select(User)).all()
        addresses = session.scalars(select(Address)).all()
        session.commit()
        _commit_elsewhere(
            db,
            update(User).where(User.id == 1).values(name="renamed"),
            delete(Address).where(Address.id == 2),
            update(Address).where(Address.id == 3).values(street="moved"),
        )
        assert [u.name for u in users] == ["user-1", "user-2", "user-3"]  # the bug
        assert [a.street for a in addresses] == ["1 Old St", "2 Old St", "3 Old St"]

        found = guard.verify(session)

        assert sorted((f.entity, f.identity, f.deleted, _names(f)) for f in found) == [
            ("Address", (2,), True, []),
            ("Address", (3,), False, ["street"]),
            ("User", (1,), False, ["name"]),
        ]
        assert sorted(found, key=repr) == sorted(_stale(guard), key=repr)


# -- 10. engine scoping ----------------------------------------------------------------


def test_guard_on_engine_a_ignores_sessions_on_engine_b(db, seed):
    """A guard installed on engine A checks nothing for a session bound to engine B."""
    seed(db)
    engine_a, engine_b = db.engine(), db.engine()
    guard = install_guard(engine_a)
    with (
        Session(engine_a, expire_on_commit=False) as on_a,
        Session(engine_b, expire_on_commit=False) as on_b,
    ):
        user_a, user_b = on_a.get(User, 1), on_b.get(User, 1)
        on_a.commit()
        on_b.commit()
        _commit_elsewhere(db, update(User).values(name="bob"))
        statements_on_a = guard.stats().statements

        assert on_b.get(User, 1).name == "alice"  # the bug, on B
        assert on_b.scalars(select(User)).one() is user_b
        on_b.execute(text("UPDATE sg_users SET email = 'b@example.com'"))
        on_b.rollback()
        assert guard.findings == []
        assert guard.stats().statements == statements_on_a

        assert on_a.get(User, 1).name == "alice"  # the same bug, on A
        assert [f.session_id for f in _stale(guard)] == [on_a.hash_key]
        assert user_a is not user_b


def test_nested_joinedload_reports_each_stale_object_once(db, seed):
    """joinedload(User.addresses).joinedload(Address.user) checks each object once."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        address = session.get(Address, 1)
        assert address.user is user
        session.commit()
        _commit_elsewhere(db, update(Address).values(street="2 New St"))
        statement = select(User).options(
            joinedload(User.addresses).joinedload(Address.user)
        )
        assert session.scalars(statement).unique().one() is user
        assert address.street == "1 Main St"  # the bug: stale street returned
        assert [(f.entity, _names(f)) for f in _stale(guard)] == [
            ("Address", ["street"])
        ]
        # address.user above was one check; the joined read checks each once
        assert guard.stats().verified_objects == 3


def test_joinedload_of_unchanged_rows_reports_nothing(db, seed):
    """A joined eager load over unchanged rows already in the map is no finding."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        user = session.get(User, 1)
        address = session.get(Address, 1)
        session.commit()
        statement = select(Address).options(joinedload(Address.user))
        assert session.scalars(statement).one() is address
        assert address.user is user
        assert guard.findings == []
        assert guard.stats().verified_objects == 2


class Owner(ExtraBase):
    __tablename__ = "sg_owners"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Pet(ExtraBase):
    __tablename__ = "sg_pets"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("sg_owners.id"))
    owner: Mapped[Owner] = relationship(lazy="joined")


@pytest.mark.parametrize("under_defaultload", [False, True])
def test_relationship_configured_lazy_joined_is_checked(db, under_defaultload):
    """
    A relationship with lazy='joined' hands back map objects that are checked,
    also under ``defaultload()``, which leaves its default loader in place.
    """
    setup = db.engine()
    ExtraBase.metadata.create_all(setup, tables=[Owner.__table__, Pet.__table__])
    try:
        with Session(setup) as session:
            session.add(Pet(id=1, owner=Owner(id=1, name="ann")))
            session.commit()
        engine = db.engine()
        guard = install_guard(engine)
        with Session(engine, expire_on_commit=False) as session:
            owner = session.get(Owner, 1)
            pet = session.get(Pet, 1)
            session.commit()
            _commit_elsewhere(db, update(Owner).values(name="ben"))
            statement = select(Pet)
            if under_defaultload:
                statement = statement.options(defaultload(Pet.owner))
            assert session.scalars(statement).one() is pet
            assert pet.owner is owner
            assert owner.name == "ann"  # the bug: stale name returned
            assert [(f.entity, _names(f)) for f in _stale(guard)] == [
                ("Owner", ["name"])
            ]
    finally:
        ExtraBase.metadata.drop_all(setup, tables=[Pet.__table__, Owner.__table__])


class Shelf(ExtraBase):
    __tablename__ = "sg_shelves"

    id: Mapped[int] = mapped_column(primary_key=True)
    books: Mapped[list[Book]] = relationship()


class Book(ExtraBase):
    __tablename__ = "sg_books"

    id: Mapped[int] = mapped_column(primary_key=True)
    shelf_id: Mapped[int] = mapped_column(ForeignKey("sg_shelves.id"))
    author_id: Mapped[int] = mapped_column(ForeignKey("sg_owners.id"))
    author: Mapped[Owner] = relationship()


_LIBRARY = [Owner.__table__, Shelf.__table__, Book.__table__]


@pytest.fixture
def library(db: Any) -> Iterator[None]:
    """Shelf 1 holds book 1 by author (an Owner) 1, "ann"."""
    setup = db.engine()
    ExtraBase.metadata.create_all(setup, tables=_LIBRARY)
    try:
        with Session(setup) as session:
            session.add(Owner(id=1, name="ann"))
            session.add(Shelf(id=1, books=[Book(id=1, author_id=1)]))
            session.commit()
        yield
    finally:
        ExtraBase.metadata.drop_all(setup, tables=list(reversed(_LIBRARY)))


@pytest.mark.parametrize(
    "loader", [defaultload, lazyload, selectinload, subqueryload, joinedload]
)
def test_joined_load_under_another_loader_is_checked_by_that_load(db, library, loader):
    """
    ``loader(Shelf.books).joinedload(Book.author)``: the author that the joined
    load hands back from the map is checked once, by whichever statement
    joined it (the read itself, its post-load, or the lazy load of
    ``shelf.books``); the shelf and the book, loaded just now, are not.
    """
    engine = db.engine()
    guard = install_guard(engine)
    with Session(engine, expire_on_commit=False) as session:
        author = session.get(Owner, 1)
        session.commit()
        _commit_elsewhere(db, update(Owner).values(name="ben"))
        statement = select(Shelf).options(loader(Shelf.books).joinedload(Book.author))
        shelf = session.scalars(statement).unique().one()
        [book] = shelf.books
        assert book.author is author
        assert author.name == "ann"  # the bug: stale name returned
        assert [(f.entity, _names(f)) for f in _stale(guard)] == [("Owner", ["name"])]
        assert guard.stats().verified_objects == 1


def test_assigning_a_many_to_one_is_not_a_read(db, seed):
    """Assigning a many-to-one peeks at the map without SQL: no check, no raise."""
    seed(db)
    engine = db.engine()
    with Session(db.engine()) as setup:
        setup.add(User(id=2, name="bea"))
        setup.commit()
    guard = install_guard(engine, on_stale="raise")
    session = Session(engine, expire_on_commit=False)
    first = session.get(User, 1)
    second = session.get(User, 2)
    address = session.scalars(select(Address)).one()  # address.user not loaded
    session.commit()
    _commit_elsewhere(db, update(User).where(User.id == 1).values(name="bob"))
    assert first.name == "alice"  # stale in the map, but not read below
    with _sql_log(engine) as statements:
        address.user = second  # the backref fetches the old value, passively
    assert statements == []
    assert guard.stats().verified_objects == 0
    assert guard.findings == []
    session.rollback()
    session.close()


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_autocommit_engine_is_checked_without_a_savepoint(db, seed):
    """On a PostgreSQL AUTOCOMMIT engine the check runs (no SAVEPOINT to fail on)."""
    seed(db)
    engine = db.engine(isolation_level="AUTOCOMMIT")
    guard = install_guard(engine)
    session = Session(engine, expire_on_commit=False)
    user = session.get(User, 1)
    _commit_elsewhere(db, update(User).values(name="bob"))
    assert session.scalars(select(User)).one().name == "alice"  # stale, returned
    assert guard.stats().verification_errors == 0
    assert [(f.entity, _names(f)) for f in _stale(guard)] == [("User", ["name"])]
    session.close()
    del user


class Code(ExtraBase):
    __tablename__ = "sg_codes"

    code: Mapped[str] = mapped_column(CHAR(5), primary_key=True)
    label: Mapped[str] = mapped_column(String(20))


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_blank_padded_char_key_is_neither_deleted_nor_stale(db):
    """A CHAR(n) key the database hands back padded still finds its row."""
    setup = db.engine()
    ExtraBase.metadata.create_all(setup, tables=[Code.__table__])
    try:
        engine = db.engine()
        guard = install_guard(engine)
        with Session(engine, expire_on_commit=False) as session:
            code = Code(code="ab", label="first")
            session.add(code)
            session.commit()
            assert session.get(Code, "ab") is code
            assert guard.findings == []
            assert guard.stats().verified_objects == 1
            _commit_elsewhere(db, update(Code).values(label="second"))
            assert session.get(Code, "ab").label == "first"  # stale, returned
            [finding] = _stale(guard)
            assert (finding.deleted, _names(finding)) == (False, ["label"])
    finally:
        ExtraBase.metadata.drop_all(setup, tables=[Code.__table__])


def test_sharded_objects_are_skipped_not_misreported(tmp_path):
    """Objects with an identity token (horizontal sharding) are skipped and counted."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.horizontal_shard import ShardedSession

    shards = {
        name: create_engine(f"sqlite:///{tmp_path / name}.sqlite") for name in "ab"
    }
    for name, engine in shards.items():
        ExtraBase.metadata.create_all(engine, tables=[Owner.__table__])
        with Session(engine) as setup:
            setup.add(Owner(id=1, name=f"in-{name}"))
            setup.commit()
    guard = install_guard(None)
    session = ShardedSession(
        shards=shards,
        shard_chooser=lambda mapper, instance, clause=None: "a",
        identity_chooser=lambda *args, **kwargs: ["a", "b"],
        execute_chooser=lambda context: ["a", "b"],
        expire_on_commit=False,
    )
    owners = session.scalars(select(Owner)).all()  # Owner 1 from a and from b
    assert sorted(owner.name for owner in owners) == ["in-a", "in-b"]
    again = session.scalars(select(Owner)).all()
    assert sorted(owner.name for owner in again) == ["in-a", "in-b"]
    assert guard.findings == []
    assert guard.stats().skipped_checks == 2
    # Objects a read reloads entirely were not served from the map: no hit,
    # so no skipped check either (skipped_checks counts hits not checked).
    session.expire_all()
    reloaded = session.scalars(select(Owner)).all()
    assert sorted(owner.name for owner in reloaded) == ["in-a", "in-b"]
    assert guard.stats().skipped_checks == 2
    session.close()
    for engine in shards.values():
        engine.dispose()


def test_writes_are_reported_whatever_the_sample_rate(sqlite_db, seed):
    """Unsynchronized writes are not sampled: ORM, text() and Core alike."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine, sample_rate=0.0)
    with Session(engine) as session:
        user = session.get(User, 1)
        session.execute(
            update(User).values(name="x").execution_options(synchronize_session=False)
        )
        session.execute(text("UPDATE sg_users SET name = 'y'"))
        session.connection().execute(update(User.__table__).values(name="z"))
        assert user.name == "alice"  # the map still holds the old value
        kinds = [
            f.statement for f in guard.findings if f.kind == "unsynchronized_write"
        ]
        assert kinds == ["orm_update", "text", "core"]


def test_a_loop_of_writes_is_reported_once_per_table_and_kind(sqlite_db, seed):
    """Repeated bypassing writes in one transaction make one finding, not one each."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine)
    with Session(engine) as session:
        user = session.get(User, 1)
        for index in range(5):
            session.execute(text(f"UPDATE sg_users SET name = 'n{index}'"))
        assert len(guard.findings) == 1
        session.commit()
        session.get(User, 1)
        session.execute(text("UPDATE sg_users SET name = 'again'"))
        assert len(guard.findings) == 2  # a new transaction reports again
        del user


def test_engine_guard_counts_only_its_engines_statements_of_a_routing_session(db, seed):
    """
    A session that chooses its engine per statement (get_bind() overridden, no
    bind): only the statements routed to the guard's engine are the guard's,
    the second and later ones too (the per-session shortcut must not stick).
    """
    seed(db)
    engine_a, engine_b = db.engine(), db.engine()
    guard = install_guard(engine_a)
    route = {"to": engine_a}

    class Routing(Session):
        def get_bind(self, mapper=None, clause=None, **kw):  # type: ignore[override]
            return route["to"]

    with Routing() as session:
        session.scalars(select(User)).all()  # on A
        session.scalars(select(User)).all()  # on A
        route["to"] = engine_b
        session.scalars(select(User)).all()  # on B: not the guard's
        session.scalars(select(User)).all()  # on B
        route["to"] = engine_a
        session.scalars(select(User)).all()  # on A
    assert guard.stats().statements == 3
