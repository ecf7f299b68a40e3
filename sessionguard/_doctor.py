"""``sessionguard doctor``: what in a database's configuration affects visibility."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TextIO

    from sqlalchemy.engine import Connection

__all__ = ["Setting", "doctor", "read_settings"]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration value and what it means for read-after-write visibility."""

    name: str
    value: str
    meaning: str
    affects_visibility: bool


_ISOLATION = {
    "READ UNCOMMITTED": "sees other transactions' uncommitted changes",
    "READ COMMITTED": (
        "each statement sees rows committed before it began: an object kept in "
        "the identity map can go stale between two statements"
    ),
    "REPEATABLE READ": (
        "the transaction keeps one snapshot (PostgreSQL) or repeats its reads "
        "(MySQL): commits by others are invisible until it ends"
    ),
    "SERIALIZABLE": (
        "like REPEATABLE READ, and conflicting transactions fail: commits by "
        "others are invisible until it ends"
    ),
    "AUTOCOMMIT": "no transaction: each statement sees the latest committed rows",
}


def _isolation(connection: Connection) -> Setting:
    level = str(connection.get_isolation_level()).upper().replace("_", " ")
    meaning = _ISOLATION.get(level, "see the database's documentation")
    return Setting("isolation level (this connection)", level, meaning, True)


def _postgresql(connection: Connection) -> list[Setting]:
    def show(name: str) -> str:
        return str(connection.execute(text(f"SHOW {name}")).scalar_one())

    default = show("default_transaction_isolation")
    return [
        Setting("server version", show("server_version"), "PostgreSQL", False),
        _isolation(connection),
        Setting(
            "default_transaction_isolation",
            default,
            "what new transactions get unless the client asks otherwise: "
            + _ISOLATION.get(default.upper(), "see the PostgreSQL documentation"),
            True,
        ),
        Setting(
            "synchronous_commit",
            show("synchronous_commit"),
            "durability only: 'off' may report a commit before its WAL is "
            "flushed, but never changes what other sessions see",
            False,
        ),
        Setting(
            "transaction_read_only",
            show("transaction_read_only"),
            "whether this session may write; a replica or read-only default "
            "makes writes fail, it does not change what reads see",
            False,
        ),
    ]


def _sqlite(connection: Connection) -> list[Setting]:
    version = str(connection.execute(text("select sqlite_version()")).scalar_one())
    journal = str(connection.execute(text("PRAGMA journal_mode")).scalar_one())
    journal_meaning = (
        "readers keep the snapshot of their read transaction and do not block "
        "the writer"
        if journal.lower() == "wal"
        else "a writer locks the database file; readers see each commit at "
        "their next statement once the lock is released"
    )
    return [
        Setting("server version", version, "SQLite library", False),
        _isolation(connection),
        Setting("journal_mode", journal, journal_meaning, True),
    ]


def _mysql(connection: Connection) -> list[Setting]:
    version = str(connection.execute(text("select version()")).scalar_one())
    return [
        Setting("server version", version, "MySQL / MariaDB", False),
        _isolation(connection),
    ]


def read_settings(url: str) -> list[Setting]:
    """Connect to *url* and read what affects read-after-write visibility."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            name = connection.dialect.name
            if name == "postgresql":
                return _postgresql(connection)
            if name == "sqlite":
                return _sqlite(connection)
            if name in ("mysql", "mariadb"):
                return _mysql(connection)
            return [_isolation(connection)]
    finally:
        engine.dispose()


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def doctor(urls: Sequence[str], out: TextIO) -> int:
    """Print each database's settings; with several, a diff. 1 when they differ."""
    results = [(url, read_settings(url)) for url in urls]
    for url, settings in results:
        out.write(f"{_safe(url)}\n")
        for setting in settings:
            out.write(f"  {setting.name}: {setting.value}\n")
            out.write(f"      {setting.meaning}\n")
    if len(results) < 2:
        return 0
    names: list[str] = []
    for _, settings in results:
        names.extend(s.name for s in settings if s.name not in names)
    relevant = {
        s.name for _, settings in results for s in settings if s.affects_visibility
    }
    width = max(len(name) for name in names)
    out.write("\nside by side:\n")
    differs = False
    for name in names:
        values = [
            next((s.value for s in settings if s.name == name), "-")
            for _, settings in results
        ]
        marker = " "
        if len(set(values)) > 1:
            marker = "!" if name in relevant else "~"
            differs = differs or name in relevant
        out.write(f"{marker} {name:{width}}  " + "  |  ".join(values) + "\n")
    if differs:
        out.write(
            "\n! a setting that changes what a session can read differs: the same "
            "code can read fresh data on one and stale data on the other\n"
        )
    return 1 if differs else 0
