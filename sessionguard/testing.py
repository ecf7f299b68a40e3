"""
Helpers for test suites: capture findings, assert none, check the schema.

::

    from sessionguard.testing import assert_schema_ready, capture

    with capture() as findings:
        client.get("/users/1")
    assert findings == []

Nothing here imports pytest; ``assert_migrations_current`` imports alembic
only when called (the ``alembic`` extra).
"""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect

from ._findings import Finding, StaleRead
from ._guard import Guard, _installed, install_guard
from .exceptions import SessionGuardError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy import Connection, Engine, MetaData

__all__ = [
    "assert_migrations_current",
    "assert_no_stale_reads",
    "assert_schema_ready",
    "capture",
]


@contextmanager
def capture() -> Iterator[list[Finding]]:
    """
    Collect the findings made inside the block, by every installed guard.

    Yields a list that fills as findings are made. When no guard is installed,
    a guard on every session is installed for the block and uninstalled after
    it. Guards installed inside the block are not watched.
    """
    findings: list[Finding] = []
    guards = [guard for guard in list(_installed.values()) if guard.installed]
    temporary = None
    if not guards:
        temporary = install_guard(None)
        guards = [temporary]
    callback = findings.append
    for guard in guards:
        # Replaced, not appended to: _record may be iterating the old list.
        guard._finding_callbacks = [*guard._finding_callbacks, callback]
    try:
        yield findings
    finally:
        for guard in guards:
            guard._finding_callbacks = [
                c for c in guard._finding_callbacks if c is not callback
            ]
        if temporary is not None:
            temporary.uninstall()


def assert_no_stale_reads(guard: Guard | None = None) -> None:
    """
    Raise ``AssertionError`` listing the stale reads in *guard*'s findings.

    Without *guard*, every installed guard is checked (the pytest plugin's
    included); with none installed, that is a :class:`SessionGuardError`,
    since nothing could have been seen.
    """
    if guard is not None:
        guards = [guard]
    else:
        guards = [g for g in list(_installed.values()) if g.installed]
        if not guards:
            raise SessionGuardError(
                "assert_no_stale_reads() found no installed guard; pass one, or "
                "install one with install_guard() or the pytest plugin"
            )
    stale = [
        finding
        for checked in guards
        for finding in checked.findings
        if isinstance(finding, StaleRead)
    ]
    if stale:
        details = "\n".join(f"- {finding.describe()}" for finding in stale)
        raise AssertionError(f"{len(stale)} stale read(s):\n{details}")


def assert_schema_ready(engine: Engine | Connection, metadata: MetaData) -> None:
    """
    Raise ``AssertionError`` naming the tables and columns of *metadata* missing.

    Compares *metadata* with what ``sqlalchemy.inspect(engine)`` sees in the
    database; extra tables and columns in the database are fine.
    """
    inspector = inspect(engine)
    missing_tables: list[str] = []
    missing_columns: list[str] = []
    for table in metadata.sorted_tables:
        qualified = f"{table.schema}.{table.name}" if table.schema else table.name
        if not inspector.has_table(table.name, schema=table.schema):
            missing_tables.append(qualified)
            continue
        present = {
            column["name"] for column in inspector.get_columns(table.name, table.schema)
        }
        missing_columns.extend(
            f"{qualified}.{column.name}"
            for column in table.columns
            if column.name not in present
        )
    if missing_tables or missing_columns:
        problems = []
        if missing_tables:
            problems.append(f"missing tables: {', '.join(missing_tables)}")
        if missing_columns:
            problems.append(f"missing columns: {', '.join(missing_columns)}")
        url = engine.engine.url
        raise AssertionError(
            f"the database schema at {url!r} is not ready: {'; '.join(problems)}. "
            "Run the migrations (or metadata.create_all()) before the tests use it."
        )


def assert_migrations_current(engine: Engine, alembic_config: Any) -> None:
    """
    Raise ``AssertionError`` unless the database is at alembic's head revision.

    *alembic_config* is an ``alembic.config.Config`` or the path of an
    ``alembic.ini``. Needs alembic (``pip install sqlalchemy-sessionguard[alembic]``).
    """
    try:
        # Imported by name: alembic is an optional extra, absent from most
        # type-checking environments.
        config_module = importlib.import_module("alembic.config")
        migration = importlib.import_module("alembic.runtime.migration")
        script_module = importlib.import_module("alembic.script")
    except ImportError as error:
        raise ImportError(
            "assert_migrations_current() needs alembic: "
            "pip install 'sqlalchemy-sessionguard[alembic]'"
        ) from error
    if isinstance(alembic_config, (str, os.PathLike)):
        alembic_config = config_module.Config(os.fspath(alembic_config))
    script = script_module.ScriptDirectory.from_config(alembic_config)
    heads = set(script.get_heads())
    with engine.connect() as connection:
        context = migration.MigrationContext.configure(connection)
        current = set(context.get_current_heads())
    if current != heads:
        at = ", ".join(sorted(current)) or "no revision (empty alembic_version)"
        head = ", ".join(sorted(heads)) or "(no revisions)"
        raise AssertionError(
            f"the database at {engine.url!r} is at revision {at}, but the head is "
            f"{head}: run `alembic upgrade head` before the tests"
        )
