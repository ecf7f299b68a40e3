"""
The model, the data and the workloads the benchmark runner times.

A workload is started (session made, objects it holds loaded), run for a
number of operations (the timed part), then stopped. Only ``run`` is timed.

- W1 select+commit: one session reused; each operation is
  ``select(Item).where(Item.id == k)``, ``scalars().one()``, ``commit()``.
  ``expire_on_commit`` is left at its default, so every read reloads an
  expired object: nothing is served from the identity map.
- W2 the same with ``expire_on_commit=False`` and references held, so every
  read is an identity-map hit (the case a 100 % guard checks every time).
- W3 request: a new session per operation, ``get(Item, k)``, a select of the
  ten rows around ``k`` (which include the object ``get`` loaded: one
  identity-map hit), one attribute updated, commit, close.
- W1-10k / W2-10k: W1 and W2 with 10,000 objects held in the session instead
  of 10, reading the same ten rows: the cost of a guard must not grow with
  the identity map.

The ``check`` callable is how the ``check-floor`` configuration runs the
guard's verification SELECT by hand: every workload calls it exactly where a
guard at 100 % finds identity-map hits. Elsewhere it is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sqlalchemy import Engine, String, bindparam, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

ROWS = 10_100
"""Rows in the table: enough for 10,000 held objects and the reads beside them."""

READ_IDS = tuple(range(1, 11))
"""The rows W1 and W2 read, in turn (and hold, in their 10-object form)."""


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sessionguard_bench_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    price: Mapped[int]


def create_data(engine: Engine) -> None:
    """(Re)create the table with ROWS rows."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            insert(Item),
            [{"id": i, "name": f"item {i}", "price": i} for i in range(1, ROWS + 1)],
        )


Check = Callable[[Session, Sequence[Item]], None]


class HandCheck:
    """
    What a guard's check of identity-map hits costs at the least: the same
    SELECT on the session's own connection (``WHERE pk = ?`` for one object,
    on the driver's cursor with SQL compiled once, as the guard does;
    ``WHERE pk IN (...)`` for several, through the Connection; inside a
    SAVEPOINT on PostgreSQL, as the guard does there), and a comparison of
    each row with the object's loaded attributes. (The benchmark's columns
    need no result processing.)
    """

    def __init__(self, dialect: Dialect) -> None:
        table = Item.__table__
        selected = select(table.c.id, table.c.name, table.c.price)
        one = selected.where(table.c.id == bindparam("pks"))
        compiled = one.compile(dialect=dialect)
        self._one_sql = compiled.string
        self._one_positional = dialect.positional
        self._many = selected.where(table.c.id.in_(bindparam("pks", expanding=True)))
        self._savepoint = dialect.name == "postgresql"

    def __call__(self, session: Session, objects: Sequence[Item]) -> None:
        connection = session.connection()
        savepoint = connection.begin_nested() if self._savepoint else None
        if len(objects) == 1:
            key = objects[0].id
            cursor = connection.connection.cursor()
            try:
                cursor.execute(
                    self._one_sql, (key,) if self._one_positional else {"pks": key}
                )
                found = cursor.fetchall()
            finally:
                cursor.close()
        else:
            found = connection.execute(
                self._many, {"pks": [item.id for item in objects]}
            ).all()
        rows = {row[0]: row for row in found}
        if savepoint is not None:
            savepoint.commit()
        for item in objects:
            row = rows.get(item.id)
            if row is None or (row[1], row[2]) != (item.name, item.price):
                # Nothing changes rows behind a benchmark session's back.
                raise AssertionError(f"hand check found item {item.id} stale")


class Workload:
    """One workload: ``start``, ``run(ops)`` (timed), ``stop``."""

    name = ""
    description = ""
    cost = 1.0
    """Rough time per operation relative to W1: --ops is divided by it."""

    def __init__(self, engine: Engine, check: Check | None) -> None:
        self.engine = engine
        self.check = check

    def start(self) -> None:
        pass

    def run(self, ops: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        pass


class _SelectCommit(Workload):
    expire_on_commit = True
    held = len(READ_IDS)

    def start(self) -> None:
        self.session = Session(self.engine, expire_on_commit=self.expire_on_commit)
        # The identity map is weak: keep references, or there is nothing in it.
        self.objects: list[Item] = list(
            self.session.scalars(select(Item).where(Item.id <= self.held))
        )
        self.session.commit()

    def run(self, ops: int) -> None:
        session, check = self.session, self.check
        for i in range(ops):
            item = session.scalars(
                select(Item).where(Item.id == READ_IDS[i % len(READ_IDS)])
            ).one()
            if check is not None and not self.expire_on_commit:
                check(session, (item,))
            session.commit()

    def stop(self) -> None:
        self.session.close()
        del self.objects


class W1(_SelectCommit):
    name = "W1"
    description = "select+commit"


class W2(_SelectCommit):
    name = "W2"
    description = "select+commit, expire_on_commit=False, every read a hit"
    expire_on_commit = False


class W1Large(W1):
    name = "W1-10k"
    description = "W1 with 10,000 objects held in the session"
    held = 10_000
    # SQLAlchemy expires all 10,000 objects at every commit.
    cost = 40.0


class W2Large(W2):
    name = "W2-10k"
    description = "W2 with 10,000 objects held in the session"
    held = 10_000


class W3(Workload):
    name = "W3"
    description = "request: new session, get + select 10 rows + update + commit"
    cost = 3.0

    def run(self, ops: int) -> None:
        engine, check = self.engine, self.check
        for i in range(ops):
            key = 1 + i % 100
            first = key - (key - 1) % 10
            with Session(engine) as session:
                item = session.get(Item, key)
                assert item is not None
                # The page around the object holds the object itself: one hit.
                session.scalars(
                    select(Item).where(Item.id.between(first, first + 9))
                ).all()
                if check is not None:
                    check(session, (item,))
                item.price += 1
                session.commit()


WORKLOADS: dict[str, type[Workload]] = {
    workload.name: workload for workload in (W1, W2, W3, W1Large, W2Large)
}
