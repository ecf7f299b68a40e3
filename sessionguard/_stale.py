"""
Stale-read detection.

Which objects a read served from the identity map is learnt from what
SQLAlchemy itself records while it makes the objects, without an event
listener: an object a statement loads in full carries that statement's
``runid``, and the statement's ``partials`` name the attributes it reloaded in
objects it found in the map. An identity lookup (``Session.get()``,
many-to-one) reloads the object it finds only if that object was expired, in
full, under a new ``runid``. A returned object the read neither made nor
reloaded entirely came from the map. Those objects are then checked with
one batched Core SELECT per mapper on the session's own connection. This
module knows nothing of logging or telemetry: it returns findings.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import operator
import random
import threading
import weakref
from collections.abc import Iterable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, bindparam, exc, select, tuple_
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.result import ChunkedIteratorResult
from sqlalchemy.orm import Mapper, Relationship, Session, loading
from sqlalchemy.orm.attributes import get_state_history
from sqlalchemy.orm.base import (
    DEFAULT_STATE_ATTR,
    PASSIVE_NO_INITIALIZE,
    PASSIVE_OFF,
    SQL_OK,
)
from sqlalchemy.orm.context import QueryContext
from sqlalchemy.sql.selectable import Select
from sqlalchemy.sql.type_api import TypeEngine
from sqlalchemy.util.concurrency import in_greenlet

from ._findings import REDACTED, AttributeDiff, StaleRead
from .exceptions import StaleReadError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from sqlalchemy.engine import Dialect
    from sqlalchemy.orm.state import InstanceState

    from ._config import GuardConfig

__all__ = [
    "CheckOutcome",
    "Hit",
    "ReadObserver",
    "acquire_hooks",
    "check_hits",
    "hits_in_rows",
    "hooks_in_place",
    "release_hooks",
]

_BATCH = 500
_PKS = "sessionguard_pks"
# Marks the guard's own SELECTs (and SAVEPOINTs) for whoever counts statements:
# ``context.execution_options`` carries it in Core events.
VERIFICATION_OPTION = "sessionguard_verification"
_VERIFICATION_OPTIONS = {VERIFICATION_OPTION: True}


def _internal_error(where: str, error: BaseException) -> None:
    """Tell every guard that one of the shared hooks failed (never raises)."""
    for observer in _hooks.observers:
        with suppress(Exception):
            observer.internal_error(where, error)


class Hit:
    """An object served from the identity map by one read."""

    __slots__ = ("fresh", "state")

    def __init__(
        self, state: InstanceState[Any], fresh: frozenset[str] = frozenset()
    ) -> None:
        self.state = state
        self.fresh = fresh
        """Attributes that the read itself (re)loaded; they cannot be stale."""

    def __repr__(self) -> str:
        return f"Hit({self.state!r}, fresh={sorted(self.fresh)!r})"


def hits_in_rows(
    rows: Sequence[Any],
    scalars: bool,
    partials: dict[InstanceState[Any], Any],
    statement: Any = None,
    runid: int | None = None,
) -> list[Hit]:
    """
    The persistent objects a read handed back that it did not fully load.

    A full load (a new object) stamps the state with the statement's *runid*;
    an object found in the map whose expired attributes the read loaded is in
    the chunk's *partials* (``QueryContext.partials``: state -> the keys it
    loaded), as SQLAlchemy keeps them for the rows of one chunk.

    Those are the entities of the result rows and, for joined eager loads
    (options of *statement*, or relationships configured ``lazy="joined"``),
    the related objects they populated.
    """
    if scalars:
        try:
            # Mostly one entity's objects: their states without a Python call
            # each. Anything else (None from an outer join, a bundle) falls
            # back to looking each element up.
            states = list(map(_STATE_OF, rows))
        except AttributeError:
            states = [getattr(element, "_sa_instance_state", None) for element in rows]
    else:
        states = [
            getattr(element, "_sa_instance_state", None)
            for row in rows
            for element in row
        ]
    returned = [state for state in states if state is not None and state.key]
    if not returned:
        return []
    seen: set[int] = set()
    repeats = False
    if (
        len(returned) > 1
        or getattr(statement, "_with_options", None)
        or _mapper_info(returned[0].manager.mapper).joined
    ):
        # (One object of a read without options, whose class joins nothing by
        # default, is all there is: a get-like read skips this.)
        paths = _joined_paths(returned, statement)
        if paths:
            # Objects that joined eager loads populated count too: every
            # returned object (loaded by this read or not) may have brought
            # some along. Each object once.
            unique = []
            for state in returned:
                if id(state) not in seen:
                    seen.add(id(state))
                    unique.append(state)
            unique.extend(_joined_related(unique, paths, seen))
            returned = unique
        else:
            repeats = len(returned) > 1  # rows may repeat an object
    hits: list[Hit] = []
    for state in returned:
        if runid is not None and state.runid == runid:
            continue  # loaded by this read
        if repeats:
            if id(state) in seen:
                continue
            seen.add(id(state))
        fresh = partials.get(state)
        if fresh is not None and state.dict.keys() - fresh <= _STATE_KEY:
            continue  # the read (re)loaded everything the object holds
        hits.append(Hit(state, frozenset(fresh) if fresh else _NOTHING))
    return hits


_NOTHING: frozenset[str] = frozenset()
# An object's __dict__ holds its InstanceState too; that is not an attribute.
_STATE_KEY = frozenset((DEFAULT_STATE_ATTR,))
_STATE_OF = operator.attrgetter("_sa_instance_state")


def _joined_paths(
    states: Sequence[InstanceState[Any]], statement: Any
) -> list[tuple[Mapper[Any], tuple[str, ...]]]:
    """
    (mapper, relationship keys) of the joined eager loads of a read.

    An option's path counts from the statement's own entities: a lazy load
    or a post-load (selectin, subquery) carries the options of the read that
    started it, and its path from there (``_current_path``). A joined load
    under a relationship this read does not join (``selectinload(A.bs)
    .joinedload(B.cs)``) belongs to that relationship's own load, which
    checks what it populates: the joined path is taken only where every
    step of it is joined in this read.
    """
    # (root mapper, keys) -> (strategy, relationships) of each option element.
    elements: dict[tuple[Mapper[Any], tuple[str, ...]], tuple[Any, tuple[Any, ...]]]
    elements = {}
    options = getattr(statement, "_with_options", ())
    current: tuple[Any, ...] = ()
    depth = 0
    if options:
        current = getattr(
            getattr(
                getattr(statement, "_compile_options", None), "_current_path", None
            ),
            "path",
            (),
        )
        depth = len(current)
    for option in options:
        for element in getattr(option, "context", ()):
            natural: tuple[Any, ...] = getattr(
                getattr(element, "path", None), "path", ()
            )
            if depth:
                if natural[:depth] != current:
                    continue  # a path of another branch of the first read
                natural = natural[depth:]
            if len(natural) < 3 or not isinstance(natural[0], Mapper):
                continue
            props = tuple(
                prop for prop in natural[1::2] if isinstance(prop, Relationship)
            )
            if len(props) * 2 + 1 != len(natural):
                continue
            path = (natural[0], tuple(prop.key for prop in props))
            strategy = getattr(element, "strategy", None)
            # An element without a strategy (defaultload(), a step on the way
            # to a deeper option) gives way to one with a strategy for the
            # same path, in whatever order they came (as SQLAlchemy's
            # _LoadElement._reconcile does).
            if strategy is not None or path not in elements:
                elements[path] = (strategy, props)
    paths: list[tuple[Mapper[Any], tuple[str, ...]]] = []
    for (root, keys), (strategy, props) in elements.items() if elements else ():
        if strategy == _JOINED and all(
            _joined_step(elements.get((root, keys[:step])), props[step - 1])
            for step in range(1, len(keys))
        ):
            paths.append((root, keys))
    # The mappers of the returned objects, each once. The class manager holds
    # its mapper as a plain attribute (state.mapper is a property); results
    # are mostly of one class, so a run of the same manager costs nothing.
    mappers: list[Mapper[Any]] = []
    last = None
    for state in states:
        manager = state.manager
        if manager is not last:
            last = manager
            mapper = manager.mapper
            if mapper not in mappers:
                mappers.append(mapper)
    for mapper in mappers:
        for key in _mapper_info(mapper).joined:
            # Joined by default unless an option says otherwise; an option
            # that says joined is among the paths already.
            element = elements.get((mapper, (key,)))
            if element is None or element[0] is None:
                paths.append((mapper, (key,)))
    return paths


_JOINED = (("lazy", "joined"),)


def _joined_step(element: tuple[Any, tuple[Any, ...]] | None, prop: Any) -> bool:
    """Whether a read joins one step of a path: by an option, else by default."""
    if element is not None and element[0] is not None:
        return bool(element[0] == _JOINED)
    return bool(prop.lazy == "joined")  # no option, or defaultload()


def _joined_related(
    states: Sequence[InstanceState[Any]],
    paths: list[tuple[Mapper[Any], tuple[str, ...]]],
    seen: set[int],
) -> Iterator[InstanceState[Any]]:
    """The objects the joined eager loads *paths* populated from *states*."""
    for state in list(states):
        for root, keys in paths:
            if state.mapper.isa(root):
                yield from _follow(state, keys, seen)


def _follow(
    state: InstanceState[Any], keys: tuple[str, ...], seen: set[int]
) -> Iterator[InstanceState[Any]]:
    value = state.dict.get(keys[0])
    if value is None:
        return
    related = value if isinstance(value, Iterable) else (value,)
    for obj in related:
        related_state = getattr(obj, "_sa_instance_state", None)
        if related_state is None or related_state.key is None:
            continue
        if id(related_state) not in seen:
            seen.add(id(related_state))
            yield related_state
        if len(keys) > 1:
            yield from _follow(related_state, keys[1:], seen)


class CheckOutcome:
    """What checking a batch of hits found."""

    __slots__ = (
        "dialect",
        "errors",
        "findings",
        "hit_count",
        "hits",
        "skipped_identity_token",
        "skipped_outside_greenlet",
        "skipped_partial_key",
        "verified",
        "verified_count",
    )

    def __init__(self) -> None:
        self.findings: list[StaleRead] = []
        self.errors: list[tuple[str, BaseException]] = []
        self.verified: dict[str, int] = {}
        """Objects checked, by entity."""
        self.verified_count = 0
        self.hits: dict[str, int] = {}
        """Objects that kept an attribute value from the identity map, by entity."""
        self.hit_count = 0
        self.skipped_outside_greenlet = 0
        self.skipped_identity_token = 0
        self.skipped_partial_key = 0
        self.dialect: Dialect | None = None
        """The dialect of the (first) database checked."""


class _MapperInfo:
    """What a check needs to know of one mapper, worked out once."""

    __slots__ = ("columns", "entity", "joined", "pk_width", "plans", "primary_key")

    def __init__(self, mapper: Mapper[Any]) -> None:
        tables = set(mapper.tables)
        primary_key = list(mapper.primary_key)
        key_columns = set(primary_key)
        columns: dict[str, Column[Any]] = {}
        for prop in mapper.column_attrs:
            column = prop.columns[0]
            # SQL-expression column_property()s are computed, not stored: skip.
            # The primary key is the identity the row is found by, not compared.
            if (
                isinstance(column, Column)
                and column.table in tables
                and not key_columns.intersection(prop.columns)
            ):
                columns[prop.key] = column
        self.columns = columns
        """The plain table columns, by attribute key."""
        self.entity: str = mapper.class_.__name__
        self.primary_key = primary_key
        self.pk_width = len(primary_key)
        self.joined = tuple(
            prop.key for prop in mapper.relationships if prop.lazy == "joined"
        )
        """Relationships loaded by joined eager loading unless a read says not."""
        self.plans: dict[tuple[str, ...], _Plan] = {}


class _Plan:
    """The check's SELECT of some attributes of a mapper, and how to compare."""

    __slots__ = ("compare", "many", "one", "raw")

    def __init__(
        self, mapper: Mapper[Any], info: _MapperInfo, keys: tuple[str, ...]
    ) -> None:
        primary_key = info.primary_key
        selected = select(*primary_key, *(info.columns[key] for key in keys))
        selected = selected.select_from(mapper.persist_selectable)
        # The option travels with the cached statement (no per-execution
        # merge): it tells the check's SELECT apart from the user's
        # (SQLAlchemy's suite hides it from its SQL assertions by it).
        if len(primary_key) == 1:
            self.one: Select[Any] | None = selected.where(
                primary_key[0] == bindparam(_PKS)
            ).execution_options(**_VERIFICATION_OPTIONS)
            criterion = primary_key[0].in_(bindparam(_PKS, expanding=True))
        else:
            self.one = None
            criterion = tuple_(*primary_key).in_(bindparam(_PKS, expanding=True))
        self.many: Select[Any] = selected.where(criterion).execution_options(
            **_VERIFICATION_OPTIONS
        )
        self.raw: weakref.WeakKeyDictionary[Dialect, _RawOne | None] = (
            weakref.WeakKeyDictionary()
        )
        """``one`` compiled for a dialect whose driver it can run on directly."""
        self.compare: dict[str, tuple[int, TypeEngine[Any] | None]] = {}
        """key: (position in the row, the type to compare with, or None for ==)."""
        for index, key in enumerate(keys):
            type_ = info.columns[key].type
            # TypeEngine.compare_values() is ``x == y``; only an override (a
            # TypeDecorator, PickleType, ARRAY...) is worth a call per value.
            plain = type(type_).compare_values is TypeEngine.compare_values
            self.compare[key] = (info.pk_width + index, None if plain else type_)


# (dialect name, driver) whose execution of a plain SELECT is the driver's
# cursor.execute(sql, parameters) and nothing more: no setinputsizes (asyncpg,
# oracledb), no execution-context hooks. The one-object check runs on their
# DB-API cursor directly, compiled once: through SQLAlchemy's Connection the
# same SELECT costs ten times as much (the execution context, the result's
# metadata), which at 100 % is most of what a checked hit costs.
# (By is_async too: postgresql+psycopg_async says driver "psycopg".)
_RAW_DRIVERS = frozenset(
    {
        ("sqlite", "pysqlite", False),
        ("sqlite", "aiosqlite", True),
        ("postgresql", "psycopg", False),
        ("postgresql", "psycopg2", False),
        ("mysql", "pymysql", False),
        ("mysql", "mysqldb", False),
        ("mysql", "aiomysql", True),
        ("mariadb", "pymysql", False),
        ("mariadb", "mysqldb", False),
        ("mariadb", "aiomysql", True),
    }
)


class _RawOne:
    """A plan's one-object SELECT, compiled for one dialect, run on the cursor."""

    __slots__ = (
        "name",
        "positional",
        "process_key",
        "processors",
        "sql",
        "types",
    )

    def __init__(self, one: Select[Any], compiled: Any, dialect: Dialect) -> None:
        # (Not the dialect itself: plan.raw is keyed by it, weakly.)
        self.sql: str = compiled.string
        self.positional = dialect.positional
        self.name = compiled.escaped_bind_names.get(_PKS, _PKS)
        self.process_key: Any = compiled._bind_processors.get(_PKS)
        self.types = [column.type for column in one.selected_columns]
        # Result processors by the cursor's type codes (SQLAlchemy picks a
        # column's processor by the type the driver reports).
        self.processors: dict[tuple[Any, ...], list[Any]] = {}

    @staticmethod
    def made(one: Select[Any], dialect: Dialect) -> _RawOne | None:
        """The raw form, or None where SQLAlchemy does more than the driver."""
        if (dialect.name, dialect.driver, dialect.is_async) not in _RAW_DRIVERS:
            return None
        try:
            compiled: Any = one.compile(dialect=dialect)
            if list(compiled.binds) != [_PKS] or (
                dialect.positional and list(compiled.positiontup or ()) != [_PKS]
            ):
                return None
            return _RawOne(one, compiled, dialect)
        except Exception:  # noqa: BLE001 - the Connection path will do
            return None

    def rows(
        self, connection: Connection, key: Any
    ) -> dict[tuple[Any, ...], Sequence[Any]]:
        process = self.process_key
        value = key if process is None else process(key)
        parameters: Any = (value,) if self.positional else {self.name: value}
        cursor = connection.connection.cursor()
        try:
            cursor.execute(self.sql, parameters)
            codes = tuple(column[1] for column in cursor.description)
            fetched = cursor.fetchall()
        finally:
            cursor.close()
        processors = self.processors.get(codes)
        if processors is None:
            dialect = connection.dialect
            processors = self.processors[codes] = [
                type_._cached_result_processor(dialect, code)
                for type_, code in zip(self.types, codes, strict=True)
            ]
        rows: dict[tuple[Any, ...], Sequence[Any]] = {}
        for fetched_row in fetched:
            row = (
                tuple(
                    value if processor is None else processor(value)
                    for processor, value in zip(processors, fetched_row, strict=True)
                )
                if any(processors)
                else tuple(fetched_row)
            )
            rows[(row[0],)] = row
        return rows


_mapper_infos: weakref.WeakKeyDictionary[Mapper[Any], _MapperInfo] = (
    weakref.WeakKeyDictionary()
)
_cache_lock = threading.Lock()


# The mapper looked up last, and its info: most reads are of one class.
_last_info: tuple[weakref.ref[Mapper[Any]] | None, _MapperInfo | None] = (None, None)


def _mapper_info(mapper: Mapper[Any]) -> _MapperInfo:
    global _last_info  # noqa: PLW0603 - a one-entry cache in front of the dict
    last_ref, last = _last_info
    if last is not None and last_ref is not None and last_ref() is mapper:
        return last
    info = _mapper_infos.get(mapper)
    if info is None:
        made = _MapperInfo(mapper)
        with _cache_lock:
            info = _mapper_infos.setdefault(mapper, made)
    _last_info = (weakref.ref(mapper), info)
    return info


def _plan(mapper: Mapper[Any], info: _MapperInfo, keys: tuple[str, ...]) -> _Plan:
    plan = info.plans.get(keys)
    if plan is None:
        made = _Plan(mapper, info, keys)
        with _cache_lock:
            plan = info.plans.setdefault(keys, made)
    return plan


def _cached_keys(
    state: InstanceState[Any], hit: Hit, columns: dict[str, Column[Any]]
) -> tuple[bool, list[str]]:
    """
    (whether the object was served from the map, and which of its cached
    attributes are unmodified: the ones to compare).

    An object the read refreshed entirely was not served from the map. Any
    other one was, even with nothing left to compare (only its key loaded,
    or only pending changes): whether its row still exists is checked.
    """
    loaded = state.dict
    fresh = hit.fresh
    committed = state.committed_state
    cached = not fresh
    keys = []
    for key in columns:
        if key not in loaded or key in fresh:
            continue
        cached = True
        # committed_state also holds attributes assigned the value they had:
        # only a real change in history keeps an attribute from the check.
        if (
            committed
            and key in committed
            and get_state_history(state, key, PASSIVE_NO_INITIALIZE).has_changes()
        ):
            continue
        keys.append(key)
    return cached, keys


# The session's per-mapper/table binds: ``.binds`` on 2.1, private on 2.0
# (read with getattr(session, BINDS, True): unknown means "there may be").
BINDS = next(
    (
        name
        for name in ("binds", "_Session__binds")
        if name in Session.__init__.__code__.co_names
    ),
    "binds",
)
_get_bind = Session.get_bind


def _bind_of(session: Session, mapper: Mapper[Any]) -> Engine | Connection:
    """``session.get_bind(mapper=mapper)``, without the call for a one-bind session."""
    bind = session.bind
    if (
        bind is not None
        and type(session).get_bind is _get_bind
        and not getattr(session, BINDS, True)
    ):
        return bind
    return session.get_bind(mapper=mapper)


def _borrow_connection(
    session: Session, bind: Engine | Connection, mapper: Mapper[Any]
) -> tuple[Connection, bool, bool]:
    """
    (the connection a check runs on, whether the check opened it, whether to
    roll back the transaction the check's SELECT autobegins on it).
    """
    transaction = session._transaction
    while transaction is not None and transaction._parent is not None:
        transaction = transaction._parent
    if transaction is not None:
        connection = _transaction_connection(transaction, bind, mapper)
        if connection is not None:
            return connection, False, False
    if isinstance(bind, Connection):
        return bind, False, not bind.in_transaction()
    assert isinstance(bind, Engine)
    return bind.connect(), True, False


def _transaction_connection(
    transaction: Any, bind: Engine | Connection, mapper: Mapper[Any]
) -> Connection | None:
    """The connection *transaction* already holds for *bind*, without acquiring one."""
    # The root transaction's connection map, keyed by bind (what 2.1.7's
    # public bound_connection() reads, after asking get_bind() once more).
    connections = getattr(transaction, "_connections", None)
    if connections is None:
        bound_connection = getattr(transaction, "bound_connection", None)
        if bound_connection is None:
            return None
        try:
            connection: Connection = bound_connection(mapper)
        except exc.InvalidRequestError:
            return None
        return connection
    entry = connections.get(bind)
    if entry is None:
        return None
    found: Connection = entry[0]
    return found


def check_hits(
    session: Session,
    hits: Sequence[Hit],
    config: GuardConfig,
    *,
    location: Callable[[], str | None],
) -> CheckOutcome:
    """
    Compare the hits' loaded, unmodified attributes with the rows now visible.

    Never raises for a failed check: errors are returned, and on PostgreSQL the
    check runs in a SAVEPOINT so that a failure leaves the transaction usable.
    """
    outcome = CheckOutcome()
    # mapper: (its info, [(state, keys to compare)], [identities])
    by_mapper: dict[
        Mapper[Any],
        tuple[_MapperInfo, list[tuple[InstanceState[Any], list[str]]], list[Any]],
    ] = {}
    session_id = session.hash_key
    for hit in hits:
        state = hit.state
        key = state.key
        # Objects of this session only, and not deleted by its own flush.
        if key is None or state.session_id != session_id or state._deleted:
            continue
        if key[2] is not None:
            # An identity token (horizontal sharding): which shard holds the
            # row is the sharded session's business; not checked, counted.
            outcome.skipped_identity_token += 1
            continue
        identity = key[1]
        if None in identity:
            # A partial primary key (a mapper over an outer join,
            # allow_partial_pks): "pk IN (...)" never matches a NULL part, so
            # the row cannot be found this way; not checked, counted.
            outcome.skipped_partial_key += 1
            continue
        mapper = state.manager.mapper
        group = by_mapper.get(mapper)
        if group is not None:
            info = group[0]
        else:
            # _mapper_info()'s one-entry cache, read here: no call per hit.
            last_ref, info = _last_info  # type: ignore[assignment]
            if last_ref is None or last_ref() is not mapper:
                info = _mapper_info(mapper)
        cached, keys = _cached_keys(state, hit, info.columns)
        if not cached:
            continue
        entity = info.entity
        outcome.hits[entity] = outcome.hits.get(entity, 0) + 1
        outcome.hit_count += 1
        if group is None:
            by_mapper[mapper] = (info, [(state, keys)], [identity])
        else:
            group[1].append((state, keys))
            group[2].append(identity)
    for mapper, (info, entries, identities) in by_mapper.items():
        try:
            _check_mapper(
                session,
                mapper,
                info,
                entries,
                identities,
                config=config,
                outcome=outcome,
                location=location,
            )
        except _OutsideGreenlet:
            outcome.skipped_outside_greenlet += len(entries)
        except Exception as error:  # noqa: BLE001 - a check never breaks the read
            outcome.errors.append((info.entity, error))
    return outcome


class _OutsideGreenlet(Exception):
    """An async driver's connection, reached from plain synchronous code."""


def _check_mapper(
    session: Session,
    mapper: Mapper[Any],
    info: _MapperInfo,
    entries: list[tuple[InstanceState[Any], list[str]]],
    identities: list[Any],
    *,
    config: GuardConfig,
    outcome: CheckOutcome,
    location: Callable[[], str | None],
) -> None:
    bind = _bind_of(session, mapper)
    dialect = bind.dialect
    if outcome.dialect is None:
        outcome.dialect = dialect
    if dialect.is_async and not in_greenlet():
        raise _OutsideGreenlet
    # The attributes to select: the first object's, in the mapper's column
    # order, unless the objects differ (then all of theirs, in that order).
    keys_of_first = entries[0][1]
    for _, state_keys in entries:
        if state_keys != keys_of_first:
            wanted = {key for _, keys in entries for key in keys}
            keys = tuple(key for key in info.columns if key in wanted)
            break
    else:
        keys = tuple(keys_of_first)
    plan = _plan(mapper, info, keys)
    rows = _fetch(session, bind, mapper, plan, identities, info.pk_width)
    for state, _ in entries:
        if state.key[1] not in rows:  # type: ignore[index]
            entries, rows = _pair_normalised_keys(entries, rows)
            break
    entity = info.entity
    outcome.verified[entity] = outcome.verified.get(entity, 0) + len(entries)
    outcome.verified_count += len(entries)
    where: str | None = None
    compare = plan.compare
    for state, state_keys in entries:
        identity: tuple[Any, ...] = state.key[1]  # type: ignore[index]
        row = rows.get(identity)
        diffs: list[AttributeDiff] = []
        if row is not None:
            loaded = state.dict
            for key in state_keys:
                cached = loaded.get(key)
                position, type_ = compare[key]
                current = row[position]
                if not (
                    cached == current
                    if type_ is None
                    else type_.compare_values(cached, current)
                ):
                    diffs.append(_diff(config, key, cached, current))
            if not diffs:
                continue
        if where is None:
            where = location()
        outcome.findings.append(
            StaleRead(
                session_id=session.hash_key,
                entity=entity,
                identity=identity,
                deleted=row is None,
                attributes=tuple(diffs),
                location=where,
            )
        )


def _pair_normalised_keys(
    entries: list[tuple[InstanceState[Any], list[str]]],
    rows: dict[tuple[Any, ...], Sequence[Any]],
) -> tuple[
    list[tuple[InstanceState[Any], list[str]]], dict[tuple[Any, ...], Sequence[Any]]
]:
    """
    Cope with a database that hands the primary key back changed.

    A CHAR(n) key comes back blank-padded, a case-insensitive collation
    matches another case: the row exists under a key that differs from the
    identity. A row that matches no identity means some unmatched object may
    be that row, so "deleted" cannot be told: one unmatched object and one
    unmatched row are paired; with more, the unmatched objects are left
    unchecked (no finding) rather than reported deleted.
    """
    wanted = {tuple(state.key[1]) for state, _ in entries if state.key is not None}
    strays = [key for key in rows if key not in wanted]
    if not strays:
        return entries, rows
    unmatched = [
        entry
        for entry in entries
        if entry[0].key is not None and tuple(entry[0].key[1]) not in rows
    ]
    if len(unmatched) == 1 and len(strays) == 1:
        state = unmatched[0][0]
        assert state.key is not None
        return entries, {**rows, tuple(state.key[1]): rows[strays[0]]}
    keep = [entry for entry in entries if entry not in unmatched]
    return keep, rows


def _diff(config: GuardConfig, key: str, cached: Any, current: Any) -> AttributeDiff:
    if config.log_values and not config.is_redacted(key):
        return AttributeDiff(key, cached, current)
    return AttributeDiff(key, REDACTED, REDACTED)


def _fetch(  # noqa: PLR0917 - positional on the hot path
    session: Session,
    bind: Engine | Connection,
    mapper: Mapper[Any],
    plan: _Plan,
    identities: list[Any],
    pk_width: int,
) -> dict[tuple[Any, ...], Sequence[Any]]:
    connection, owned, restore_autobegin = _borrow_connection(session, bind, mapper)
    savepoint = None
    try:
        if (
            not owned
            and connection.dialect.name == "postgresql"
            and connection.in_transaction()
            and not _autocommit(connection)
        ):
            # A failed statement aborts a PostgreSQL transaction; the SAVEPOINT
            # keeps the user's transaction alive if the check fails. (Under
            # AUTOCOMMIT there is no transaction to keep, and no SAVEPOINT.)
            savepoint = connection.begin_nested()
        rows: dict[tuple[Any, ...], Sequence[Any]] = {}
        if plan.one is not None and len(identities) == 1:
            # One object: "pk = :pk" (an expanding IN costs a rewrite of the
            # compiled SQL on every execution); on the driver's cursor itself
            # on the session's own transaction, where the driver allows.
            raw = _raw_one(plan, plan.one, connection) if not owned else None
            if raw is not None and not restore_autobegin:
                rows = raw.rows(connection, identities[0][0])
            else:
                for row in connection.execute(plan.one, {_PKS: identities[0][0]}):
                    rows[(row[0],)] = row
        else:
            for start in range(0, len(identities), _BATCH):
                chunk = identities[start : start + _BATCH]
                params = [ident[0] for ident in chunk] if pk_width == 1 else chunk
                for row in connection.execute(plan.many, {_PKS: params}):
                    rows[tuple(row[:pk_width])] = row
        if savepoint is not None:
            savepoint.commit()
            savepoint = None
        return rows
    finally:
        if savepoint is not None and savepoint.is_active:
            savepoint.rollback()
        if owned:
            connection.close()
        elif restore_autobegin and connection.in_transaction():
            connection.rollback()


def _raw_one(plan: _Plan, one: Select[Any], connection: Connection) -> _RawOne | None:
    """The plan's raw one-object SELECT for *connection*, or None."""
    if connection._execution_options.get("schema_translate_map"):
        return None  # SQLAlchemy rewrites the schema names at execution
    dialect = connection.dialect
    try:
        return plan.raw[dialect]
    except KeyError:
        made = _RawOne.made(one, dialect)
        with _cache_lock:
            plan.raw[dialect] = made
        return made


def _autocommit(connection: Connection) -> bool:
    """Whether the connection runs in AUTOCOMMIT (same check on 2.0 and 2.1)."""
    check = getattr(connection, "_is_autocommit_isolation", None)
    return bool(check()) if check is not None else False


class ReadObserver:
    """A guard, as the process-wide read hooks see it."""

    def statement_rate(self) -> float:
        """The fraction of ORM statements it checks (0.0: none)."""
        raise NotImplementedError

    def samples_statement(self, given: float) -> bool:
        """
        Whether to check the next ORM statement it covers, knowing that the
        hook's own coin passed it with probability *given* (the highest
        statement rate of all guards).
        """
        raise NotImplementedError

    def covers_statement(self, session: Session, connection: Connection) -> bool:
        """Whether a sampled ORM statement on *connection* is this guard's."""
        raise NotImplementedError

    def statement_hits(self, session: Session, hits: list[Hit]) -> None:
        """Objects a sampled ORM statement served from the identity map."""
        raise NotImplementedError

    def covers_lookup(self, session: Session, mapper: Mapper[Any]) -> bool:
        """Whether to check what an identity lookup serves (sampling included)."""
        raise NotImplementedError

    def identity_hit(self, session: Session, hit: Hit) -> None:
        """An object ``Session.get()`` or a many-to-one load served from the map."""
        raise NotImplementedError

    def internal_error(self, where: str, error: BaseException) -> None:
        """A shared hook failed; it carried on as if it were not there."""
        raise NotImplementedError


class _Hooks:
    """The process-wide listeners and patches, reference counted."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users = 0
        self.statement_users = 0
        self.observers: tuple[ReadObserver, ...] = ()
        self.original_identity_lookup: Any = None
        self.original_instances: Any = None
        # The highest statement sample rate of the guards, and a coin for it:
        # an ORM statement no guard samples costs one random number here.
        self.statement_rate = 0.0
        self.random = random.Random()


_hooks = _Hooks()


def _update_statement_rate() -> None:
    """Recompute _hooks.statement_rate (lock held)."""
    _hooks.statement_rate = max(
        (observer.statement_rate() for observer in _hooks.observers), default=0.0
    )


_END = object()
# What a guard raises on purpose through a hook: on_stale="raise", and
# on_stale="warn" under warnings turned into errors. Everything else fails open.
_ASKED_FOR = (StaleReadError, Warning)


def _guarded_instances(cursor: Any, context: Any) -> Any:
    """
    ``sqlalchemy.orm.loading.instances``, watched.

    The result SQLAlchemy builds is handed back as it is (same object, same
    type, same laziness); only its chunk generator is wrapped, so that the
    objects of each chunk are checked once SQLAlchemy has made them, at the
    moment the caller fetches them.
    """
    original = _hooks.original_instances
    # Sampling first: an unsampled statement is not looked at. One coin for
    # the highest rate, then each guard's share of what it let through.
    # (random() is in [0, 1): at 1.0 every statement passes, at 0.0 none.)
    given = _hooks.statement_rate
    if _hooks.random.random() >= given:
        return original(cursor, context)
    sampled: list[ReadObserver] | None = None
    try:
        for observer in _hooks.observers:
            if observer.samples_statement(given):
                if sampled is None:
                    sampled = [observer]
                else:
                    sampled.append(observer)
    except _ASKED_FOR:
        raise
    except Exception as error:  # noqa: BLE001 - a hook fails open
        _internal_error("orm statement", error)
    if sampled is None:
        return original(cursor, context)
    interested: list[ReadObserver] | None = None
    try:
        # Loads that overwrite what they find (populate_existing, refresh()
        # and unexpire loads) cannot serve stale state; the objects of DML
        # RETURNING are the session's own writes; a server-side cursor cannot
        # share its connection with a check while it is being read.
        statement = context.query
        execution_context = getattr(cursor, "context", None)
        if not (
            # Columns only (select(User.id), count()): no objects, no hits.
            not getattr(context.compile_state, "_has_mapper_entities", True)
            or context.populate_existing
            or context.refresh_state is not None
            or execution_context is None
            or execution_context._is_server_side
            or (
                type(statement) is not Select  # a plain SELECT is no DML
                and (
                    getattr(statement, "is_dml", False)
                    or getattr(getattr(statement, "element", None), "is_dml", False)
                )
            )
        ):
            session = context.session
            connection = execution_context.root_connection
            for observer in sampled:
                if observer.covers_statement(session, connection):
                    if interested is None:
                        interested = [observer]
                    else:
                        interested.append(observer)
    except _ASKED_FOR:
        raise
    except Exception as error:  # noqa: BLE001 - a hook fails open
        _internal_error("orm statement", error)
        interested = None
    if interested is None:
        return original(cursor, context)
    result = original(cursor, context)
    try:
        _watch_chunks(result, context, interested)
    except _ASKED_FOR:
        raise
    except Exception as error:  # noqa: BLE001 - a hook fails open
        _internal_error("orm statement", error)
    return result


def _watch_chunks(result: Any, context: Any, observers: list[ReadObserver]) -> None:
    if not isinstance(result, ChunkedIteratorResult):
        return
    source_chunks = result.chunks
    scalars = result._source_supports_scalars
    session = context.session
    statement = context.query
    runid = context.runid

    if context.execution_options.get("prebuffer_rows", False):
        # The objects are made already (AsyncSession asks for this, and the
        # rows are then read outside the greenlet), in one chunk whose
        # partials the context still holds: check them now.
        for rows in source_chunks(None):
            _report_hits(
                session, rows, observers, scalars, context.partials, statement, runid
            )
        return

    # The map SQLAlchemy's row processors were given in instances() (they keep
    # it, even if close() or expunge_all() puts a new one in the session).
    in_map: dict[Any, Any] | None = getattr(session.identity_map, "_dict", None)

    def chunks(size: int | None) -> Iterator[Any]:
        source = source_chunks(size)
        # What the statement reloaded so far: SQLAlchemy starts new partials
        # for each chunk, and an object reloaded in one chunk and repeated in
        # a later one (yield_per) was reloaded by this statement all the same.
        reloaded: dict[InstanceState[Any], Any] | None = None
        owned: dict[InstanceState[Any], Any] | None = None
        while True:
            if in_map is not None and not in_map and _map_empty_now(session):
                # Nothing in the map: every object of this chunk is made by
                # it (a new session's first read), none can be served stale.
                # (Polymorphic sub-mappers' row processors are made while the
                # rows are read, with the map of that moment: both are empty.)
                rows = next(source, _END)
                if rows is _END:
                    return
                yield rows
                continue
            rows = next(source, _END)
            if rows is _END:
                return
            partials = context.partials
            if reloaded is None:
                reloaded = partials  # the first chunk: SQLAlchemy's own dict
            elif partials:
                if owned is None:  # a copy of our own, made once
                    owned = reloaded = dict(reloaded)
                _merge(owned, partials)
            _report_hits(session, rows, observers, scalars, reloaded, statement, runid)
            yield rows

    result.chunks = chunks
    # Nothing has been fetched yet: rebuild the iterator as the result made it
    # (yield_per included) over the watched chunks.
    result.iterator = itertools.chain.from_iterable(chunks(result._yield_per))


def _merge(
    reloaded: dict[InstanceState[Any], Any], partials: dict[InstanceState[Any], Any]
) -> None:
    """Add a new chunk's reloaded attributes to those so far, per object."""
    for state, keys in partials.items():
        before = reloaded.get(state)
        reloaded[state] = keys if before is None else set(before) | set(keys)


def _map_empty_now(session: Session) -> bool:
    try:
        return not session.identity_map._dict
    except Exception:  # noqa: BLE001 - a hook fails open: then look
        return False


def _report_hits(  # noqa: PLR0917 - positional on the hot path
    session: Session,
    rows: Any,
    observers: list[ReadObserver],
    scalars: bool,
    partials: dict[InstanceState[Any], Any],
    statement: Any,
    runid: int,
) -> None:
    try:
        hits = hits_in_rows(rows, scalars, partials, statement, runid)
    except _ASKED_FOR:
        raise
    except Exception as error:  # noqa: BLE001 - a hook fails open
        _internal_error("orm statement", error)
        return
    if hits:
        for observer in observers:
            # Fail-open by itself; raises only what on_stale="raise" asks for.
            observer.statement_hits(session, hits)


def _guarded_identity_lookup(
    self: Session, mapper: Mapper[Any], *args: Any, **kwargs: Any
) -> Any:
    original = _hooks.original_identity_lookup
    if not _hooks.observers:
        return original(self, mapper, *args, **kwargs)
    held = None
    interested: list[ReadObserver] | None = None
    try:
        # An empty map answers nothing: the read goes to the database, where
        # the statement hooks and listeners see it.
        interested = (
            _lookup_observers(self, mapper, args, kwargs)
            if self.identity_map._dict
            else None
        )
        if interested:
            held = _held_state(self, mapper, args, kwargs)
    except _ASKED_FOR:
        raise
    except Exception as error:  # noqa: BLE001 - a hook fails open
        _internal_error("identity lookup", error)
    if held is None or not interested:
        return original(self, mapper, *args, **kwargs)
    runid = held.runid
    instance = original(self, mapper, *args, **kwargs)
    try:
        # The object the map held, handed back as it was: a hit. An expired
        # one is reloaded in full by the lookup, under a new runid: not one.
        state = getattr(instance, "_sa_instance_state", None)
        hit = (
            Hit(state, _NOTHING)
            if state is held and state.runid == runid and state.key is not None
            else None
        )
    except _ASKED_FOR:
        raise
    except Exception as error:  # noqa: BLE001 - a hook fails open
        _internal_error("identity lookup", error)
        return instance
    if hit is not None:
        for observer in interested:
            # Fail-open by itself; raises only what on_stale="raise" asks for.
            observer.identity_hit(self, hit)
    return instance


def _held_state(
    session: Session, mapper: Mapper[Any], args: tuple[Any, ...], kwargs: Any
) -> InstanceState[Any] | None:
    """The state the map holds for the lookup's key, as the lookup finds it."""
    # (primary_key_identity, identity_token, ...), as _identity_lookup makes
    # its key.
    identity = args[0] if args else kwargs["primary_key_identity"]
    token = args[1] if len(args) > 1 else kwargs.get("identity_token")
    key = mapper.identity_key_from_primary_key(identity, identity_token=token)
    state: InstanceState[Any] | None = session.identity_map._dict.get(key)
    return state


def _lookup_observers(
    session: Session, mapper: Mapper[Any], args: tuple[Any, ...], kwargs: Any
) -> list[ReadObserver] | None:
    # (primary_key_identity, identity_token, passive, ...): a lookup whose
    # passive flags forbid SQL only peeks at the map (a backref fetching the
    # old value of an assignment, the unit of work): it is not a read.
    passive = (
        kwargs["passive"]
        if "passive" in kwargs
        else (args[2] if len(args) > 2 else PASSIVE_OFF)
    )
    if not passive & SQL_OK or session._flushing:
        return None
    interested = None
    for observer in _hooks.observers:
        if observer.covers_lookup(session, mapper):
            if interested is None:
                interested = [observer]
            else:
                interested.append(observer)
    return interested


def _lookup_signature_ok() -> bool:
    function = getattr(Session, "_identity_lookup", None)
    if function is None:
        return False
    parameters = list(inspect.signature(function).parameters)
    return parameters[:3] == ["self", "mapper", "primary_key_identity"]


def _instances_signature_ok() -> bool:
    function = getattr(loading, "instances", None)
    if function is None:
        return False
    # hits_in_rows reads what the QueryContext records of partial loads.
    return list(inspect.signature(function).parameters) == [
        "cursor",
        "context",
    ] and "partials" in getattr(QueryContext, "__slots__", ())


def acquire_hooks(observer: ReadObserver, *, statements: bool = True) -> None:
    """
    Register the read hooks (once per process).

    The hooks wrap ``Session._identity_lookup`` (``Session.get()`` and
    many-to-one loads) and, when *statements*, ``sqlalchemy.orm.loading.instances``
    (every ORM statement's objects). Their signatures, and the QueryContext
    attribute the statement hook reads, are checked first (they are the same
    on 2.0.x and 2.1.x).
    """
    with _hooks.lock:
        if _hooks.users == 0 and _lookup_signature_ok():
            _hooks.original_identity_lookup = Session.__dict__["_identity_lookup"]
            # Name, docstring and signature stay SQLAlchemy's for inspection.
            functools.update_wrapper(
                _guarded_identity_lookup, _hooks.original_identity_lookup
            )
            Session._identity_lookup = _guarded_identity_lookup  # type: ignore[method-assign]
        _hooks.users += 1
        if statements:
            if _hooks.statement_users == 0 and _instances_signature_ok():
                _hooks.original_instances = loading.instances
                functools.update_wrapper(_guarded_instances, loading.instances)
                loading.instances = _guarded_instances
            _hooks.statement_users += 1
        _hooks.observers = (*_hooks.observers, observer)
        _update_statement_rate()


def hooks_in_place() -> bool:
    """Whether the statement hook is still in place (someone may restore it)."""
    return _hooks.original_instances is None or loading.instances is _guarded_instances


def release_hooks(observer: ReadObserver, *, statements: bool = True) -> None:
    """Undo :func:`acquire_hooks` once the last guard is gone."""
    with _hooks.lock:
        _hooks.observers = tuple(o for o in _hooks.observers if o is not observer)
        _update_statement_rate()
        _hooks.users -= 1
        if _hooks.users == 0 and _hooks.original_identity_lookup is not None:
            Session._identity_lookup = _hooks.original_identity_lookup  # type: ignore[method-assign]
            _hooks.original_identity_lookup = None
        if not statements:
            return
        _hooks.statement_users -= 1
        if _hooks.statement_users == 0 and _hooks.original_instances is not None:
            loading.instances = _hooks.original_instances
            _hooks.original_instances = None
