"""
``sessionguard doctor``: what in a database's configuration affects visibility.

Every sentence printed about what a session sees is observed by a test that
makes two connections (tests/test_doctor.py); change one only with its test.
doctor never creates or changes anything: SQLite files are opened read-only,
and only ``SHOW``/``SELECT``/``PRAGMA`` reads are sent, in a transaction that is
rolled back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import sys
import urllib.parse
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, exc, text
from sqlalchemy.engine import Engine, make_url

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TextIO

    from sqlalchemy.engine import URL, Connection

__all__ = [
    "DoctorError",
    "Report",
    "Setting",
    "doctor",
    "mask",
    "read_report",
    "read_settings",
]

# Rows every backend has, so that two databases of different kinds compare.
VISIBILITY = "visibility"
READ_ONLY = "read-only"
ISOLATION = "isolation level"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration value and what it means for read-after-write visibility."""

    name: str
    value: str
    meaning: str
    affects_visibility: bool
    """Whether a difference in this value changes what a session reads."""


@dataclasses.dataclass(frozen=True)
class Report:
    """What doctor found about one database."""

    url: str
    """The URL as given, password masked."""
    system: str
    """``sqlite``, ``postgresql``, ``mariadb``, ``mysql`` or the dialect's name."""
    settings: tuple[Setting, ...]

    def value(self, name: str) -> str | None:
        return next((s.value for s in self.settings if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "system": self.system,
            "settings": [dataclasses.asdict(s) for s in self.settings],
        }


class DoctorError(Exception):
    """A database doctor cannot read: the message is one line, URL masked."""


# -- what each level means -------------------------------------------------------------

PER_STATEMENT = "per statement"
SNAPSHOT = "snapshot"
LOCKED_READS = "locked reads"
UNCOMMITTED = "uncommitted"

_STALE_BETWEEN = "an object kept in the identity map can go stale between two reads"
_PER_STATEMENT_MEANING = (
    f"each statement sees what other connections committed before it: {_STALE_BETWEEN}"
)


def _snapshot_meaning(taken_at: str) -> str:
    return (
        f"the transaction reads one snapshot, taken at its first {taken_at}: other "
        "connections' commits stay invisible until it ends"
    )


def _level(raw: str) -> str:
    return raw.strip().upper().replace("-", " ").replace("_", " ")


# -- SQLite ----------------------------------------------------------------------------

LEGACY = "legacy (BEGIN before the first write)"
BEGIN_FIRST = "BEGIN at the first statement"
AUTOCOMMIT = "autocommit"


def _sqlite_transaction_control(connection: Connection) -> str:
    """How transactions start on this connection, observed rather than assumed.

    pysqlite's legacy transaction control sends BEGIN only before INSERT, UPDATE,
    DELETE or REPLACE; Python 3.12's ``autocommit=False`` and SQLAlchemy's
    recipe (``isolation_level=None`` on connect, a ``begin`` listener that
    emits BEGIN) open the transaction at the first statement. So run a SELECT
    in a SQLAlchemy transaction and ask the driver whether one is open.
    """
    dbapi: Any = connection.connection.dbapi_connection
    if getattr(dbapi, "autocommit", None) is True:
        return AUTOCOMMIT
    connection.execute(text("SELECT 1"))
    begun = getattr(dbapi, "in_transaction", None)
    if begun is True:
        return BEGIN_FIRST
    if getattr(dbapi, "isolation_level", "") is None:
        return AUTOCOMMIT
    return LEGACY


_SQLITE_CONTROL = {
    LEGACY: (
        "the driver (pysqlite's legacy transaction control) sends BEGIN only before "
        "the first INSERT, UPDATE or DELETE, so a session's reads before its first "
        "write run outside any transaction"
    ),
    BEGIN_FIRST: "a transaction begins with the session's first statement",
    AUTOCOMMIT: (
        "no transaction: every statement commits on its own, and a rollback "
        "undoes nothing"
    ),
}


def _sqlite_visibility(control: str, journal: str) -> Setting:
    if control == LEGACY:
        return Setting(
            VISIBILITY,
            PER_STATEMENT,
            "until its first write, each statement sees what other connections "
            "committed before it; from its first write until it ends, other "
            f"connections cannot write ('database is locked'): {_STALE_BETWEEN}",
            True,
        )
    if control == AUTOCOMMIT:
        return Setting(VISIBILITY, PER_STATEMENT, _PER_STATEMENT_MEANING, True)
    if journal == "wal":
        return Setting(VISIBILITY, SNAPSHOT, _snapshot_meaning("read"), True)
    return Setting(
        VISIBILITY,
        LOCKED_READS,
        "after its first read, other connections cannot commit until it ends (they "
        "wait, then fail with 'database is locked'), so its reads do not change",
        True,
    )


def _uri_mode(url: URL) -> str | None:
    """The ``mode=`` of an SQLite URI URL (SQLAlchemy keeps it in the query)."""
    mode = url.query.get("mode")
    return mode if isinstance(mode, str) else None


def _sqlite_file(url: URL) -> str | None:
    """The file an SQLite URL names, or None for an in-memory database."""
    database = url.database or ""
    if database in ("", ":memory:"):
        return None
    if url.query.get("uri") in ("true", "1"):
        parsed = urllib.parse.urlparse(database)
        if parsed.scheme == "file":
            if _uri_mode(url) == "memory":
                return None
            return urllib.parse.unquote(parsed.path)
        return None
    return os.path.abspath(database)


@dataclasses.dataclass(frozen=True)
class _SQLiteFile:
    """What the user's SQLite URL opens, seen without opening it for writing."""

    path: str | None = None
    read_only: bool = False

    def journal_mode(self) -> str | None:
        """``wal`` or ``delete``, from the file header; None for no file.

        Only WAL persists in the file: the other modes are per connection, and a
        new connection gets the default rollback journal (``delete``).
        """
        if self.path is None:
            return None
        with open(self.path, "rb") as database:
            header = database.read(20)
        return "wal" if header[18:20] == b"\x02\x02" else "delete"


def _sqlite_read_only_url(url: URL, masked: str) -> tuple[URL, _SQLiteFile]:
    """*url* opened read-only, and what the user's URL opens.

    ``mode=ro`` alone still creates the ``-wal`` and ``-shm`` files beside a WAL
    database, so ``immutable=1`` too: no file is created, no lock taken. A file
    that does not exist is an error: opening it would create it.
    """
    path = _sqlite_file(url)
    if path is None:
        return url, _SQLiteFile()
    if not os.path.isfile(path):
        raise DoctorError(
            f"{masked}: no SQLite database file at {path} (doctor never creates "
            "one): check the path; sqlite:///name.db is relative to the current "
            "directory, sqlite:////abs/name.db is absolute"
        )
    query = dict(url.query)
    if query.get("uri") in ("true", "1"):
        read_only = _uri_mode(url) == "ro"
        query.update(mode="ro", immutable="1")
        database = url.database or ""
    else:
        writable = os.access(path, os.W_OK) and os.access(
            os.path.dirname(path) or ".", os.W_OK
        )
        read_only = not writable
        database = f"file:{urllib.parse.quote(path)}"
        query.update(mode="ro", immutable="1", uri="true")
    return url.set(database=database, query=query), _SQLiteFile(path, read_only)


def _sqlite(connection: Connection, opened: _SQLiteFile) -> list[Setting]:
    version = str(connection.execute(text("select sqlite_version()")).scalar_one())
    journal = opened.journal_mode() or str(
        connection.execute(text("PRAGMA journal_mode")).scalar_one()
    )
    journal = journal.lower()
    control = _sqlite_transaction_control(connection)
    python = ".".join(str(part) for part in sys.version_info[:3])
    if opened.path is None and journal == "memory":
        journal_meaning = "an in-memory database: no other connection shares it"
    elif journal == "wal":
        journal_meaning = (
            "write-ahead log: a connection reading in a transaction keeps its "
            "snapshot while another connection commits"
        )
    else:
        journal_meaning = (
            "rollback journal: another connection cannot commit while a "
            "transaction that has read is open"
        )
    return [
        Setting(
            "server version",
            version,
            f"SQLite library, Python {python} sqlite3 driver",
            False,
        ),
        Setting(
            "isolation level (SQLAlchemy)",
            str(connection.get_isolation_level()),
            "what SQLAlchemy reports for every SQLite connection; what a session "
            "reads depends on the transaction control",
            False,
        ),
        Setting("transaction control", control, _SQLITE_CONTROL[control], True),
        # Which journal only matters to reads inside a transaction.
        Setting("journal_mode", journal, journal_meaning, control == BEGIN_FIRST),
        _sqlite_visibility(control, journal),
        _read_only(
            opened.read_only,
            "writes fail ('attempt to write a readonly database')",
        ),
    ]


# -- PostgreSQL ------------------------------------------------------------------------


def _read_only(on: bool, failure: str) -> Setting:
    if on:
        return Setting(READ_ONLY, "on", f"{failure}; reads are unchanged", True)
    return Setting(READ_ONLY, "off", "this session may write", True)


def _postgresql_visibility(level: str) -> Setting:
    if level in ("READ COMMITTED", "READ UNCOMMITTED"):
        # PostgreSQL runs READ UNCOMMITTED as READ COMMITTED.
        return Setting(VISIBILITY, PER_STATEMENT, _PER_STATEMENT_MEANING, True)
    return Setting(VISIBILITY, SNAPSHOT, _snapshot_meaning("statement"), True)


def _postgresql(connection: Connection) -> list[Setting]:
    def show(name: str) -> str:
        return str(connection.execute(text(f"SHOW {name}")).scalar_one())

    level = _level(show("transaction_isolation"))
    default = _level(show("default_transaction_isolation"))
    return [
        Setting("server version", show("server_version"), "PostgreSQL", False),
        Setting(
            ISOLATION,
            level,
            "this connection's transactions"
            + (" (run as READ COMMITTED)" if level == "READ UNCOMMITTED" else ""),
            True,
        ),
        Setting(
            "default_transaction_isolation",
            default,
            "what new transactions get unless the client asks otherwise",
            True,
        ),
        _postgresql_visibility(level),
        Setting(
            "synchronous_commit",
            show("synchronous_commit"),
            "durability only: 'off' may report a commit before its WAL is "
            "flushed, but other sessions see the commit just the same",
            False,
        ),
        _read_only(
            show("transaction_read_only") == "on",
            "writes fail ('cannot execute ... in a read-only transaction')",
        ),
    ]


# -- MariaDB / MySQL -------------------------------------------------------------------

_MYSQL_VARIABLES = (
    "transaction_isolation",
    "tx_isolation",
    "autocommit",
    "innodb_snapshot_isolation",
    "transaction_read_only",
    "tx_read_only",
    "read_only",
)


def _mysql_variables(connection: Connection, scope: str) -> dict[str, str]:
    names = ", ".join(f"'{name}'" for name in _MYSQL_VARIABLES)
    rows = connection.exec_driver_sql(
        f"SHOW {scope} VARIABLES WHERE Variable_name IN ({names})"
    )
    return {str(name).lower(): str(value) for name, value in rows}


def _mysql_visibility(level: str, autocommit: bool) -> Setting:
    if autocommit:
        return Setting(
            VISIBILITY,
            PER_STATEMENT,
            "autocommit: every statement is a transaction of its own and sees what "
            f"other connections committed before it: {_STALE_BETWEEN}",
            True,
        )
    if level == "READ UNCOMMITTED":
        return Setting(
            VISIBILITY,
            UNCOMMITTED,
            "each statement sees other connections' changes even before they "
            f"commit: {_STALE_BETWEEN}",
            True,
        )
    if level == "READ COMMITTED":
        return Setting(VISIBILITY, PER_STATEMENT, _PER_STATEMENT_MEANING, True)
    if level == "SERIALIZABLE":
        return Setting(
            VISIBILITY,
            LOCKED_READS,
            "plain SELECTs take shared locks: another connection's change to a row "
            "the transaction has read waits until it ends",
            True,
        )
    return Setting(
        VISIBILITY,
        SNAPSHOT,
        _snapshot_meaning("read")
        + " (UPDATE, DELETE and SELECT ... FOR UPDATE read the "
        "latest committed rows)",
        True,
    )


def _on(value: str | None) -> bool:
    return (value or "").upper() in ("ON", "1", "TRUE")


def _mysql(connection: Connection) -> list[Setting]:
    version = str(connection.execute(text("select version()")).scalar_one())
    mariadb = "mariadb" in version.lower()
    session = _mysql_variables(connection, "SESSION")
    glob = _mysql_variables(connection, "GLOBAL")

    def variable(values: dict[str, str], *names: str) -> str | None:
        return next((values[n] for n in names if n in values), None)

    level = _level(variable(session, "transaction_isolation", "tx_isolation") or "")
    global_level = _level(variable(glob, "transaction_isolation", "tx_isolation") or "")
    autocommit = _on(session.get("autocommit"))
    settings = [
        Setting("server version", version, "MariaDB" if mariadb else "MySQL", False),
        Setting(ISOLATION, level, "this connection's transactions", True),
        Setting(
            "transaction_isolation (global)",
            global_level,
            "what new connections get unless they set their own",
            True,
        ),
        Setting(
            "autocommit (session)",
            "ON" if autocommit else "OFF",
            "every statement commits on its own"
            if autocommit
            else "statements run in a transaction until commit or rollback "
            "(SQLAlchemy's drivers turn autocommit off)",
            False,
        ),
        Setting(
            "autocommit (global)",
            glob.get("autocommit", "?"),
            "what new connections start with; SQLAlchemy's drivers turn it off for "
            "their own",
            False,
        ),
    ]
    if "innodb_snapshot_isolation" in session:
        snapshot_on = _on(session["innodb_snapshot_isolation"])
        settings.append(
            Setting(
                "innodb_snapshot_isolation",
                session["innodb_snapshot_isolation"],
                "under REPEATABLE READ, writing a row that another connection "
                "changed and committed after this transaction's snapshot fails "
                "('Record has changed since last read')"
                if snapshot_on
                else "under REPEATABLE READ, writing a row that another connection "
                "changed and committed after this transaction's snapshot succeeds "
                "on the newer row, and later reads of that row show it",
                True,
            )
        )
    settings.append(_mysql_visibility(level, autocommit))
    settings.append(
        _read_only(
            _on(variable(session, "transaction_read_only", "tx_read_only")),
            "writes fail ('Cannot execute statement in a READ ONLY transaction')",
        )
    )
    settings.append(
        Setting(
            "read_only (global)",
            glob.get("read_only", "?"),
            "writes fail for users without the privilege to bypass it (a replica, "
            "usually)"
            if _on(glob.get("read_only"))
            else "the server accepts writes",
            False,
        )
    )
    return settings


def _generic(connection: Connection) -> list[Setting]:
    return [
        Setting(
            ISOLATION,
            _level(str(connection.get_isolation_level())),
            "this connection's transactions (see the database's documentation)",
            True,
        )
    ]


# -- connecting, and saying what went wrong in one line --------------------------------

# Import name of a driver -> what to pip install.
_PIP_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "asyncpg": "asyncpg",
    "pg8000": "pg8000",
    "pymysql": "PyMySQL",
    "MySQLdb": "mysqlclient",
    "mysql": "mysql-connector-python",
    "mariadb": "mariadb",
    "aiomysql": "aiomysql",
    "asyncmy": "asyncmy",
    "aiosqlite": "aiosqlite",
    "oracledb": "oracledb",
    "cx_Oracle": "oracledb",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
    "greenlet": "sqlalchemy[asyncio]",
}


def mask(url: str | URL) -> str:
    """*url* with its password replaced by ``***``, parseable or not."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", str(url))


def _driver_message(error: exc.DBAPIError) -> str:
    orig: Any = error.orig
    args: tuple[Any, ...] = getattr(orig, "args", ())
    if len(args) == 2 and isinstance(args[0], int):  # MySQL drivers: (code, text)
        message = f"{args[1]} (error {args[0]})"
    else:
        message = str(orig) if orig is not None else str(error)
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


def _connect_error(masked: str, url: URL, error: exc.DBAPIError) -> DoctorError:
    message = _driver_message(error)
    lowered = message.lower()
    where = f"{url.host or 'localhost'}" + (f":{url.port}" if url.port else "")
    if re.search(
        r"password|authentication|access denied|role .* does not exist|"
        r"not permitted to log in|no pg_hba.conf entry",
        lowered,
    ):
        advice = (
            "check the user name and password in the URL, and that the server "
            "lets that user in (pg_hba.conf, GRANT)"
        )
        what = "the server rejected the login"
    elif re.search(r"database .* does not exist|unknown database", lowered):
        advice = "check the database name in the URL"
        what = "no such database"
    elif re.search(
        r"refused|can't connect|could not connect|timed out|timeout|"
        r"could not translate host|name or service not known|no route|"
        r"connection failed|unreachable|no such file or directory",
        lowered,
    ):
        advice = f"is the server running and listening at {where}?"
        what = "cannot reach the server"
    else:
        advice = "check the URL and the server"
        what = "cannot read the settings"
    return DoctorError(f"{masked}: {what}: {message}; {advice}")


def _engine(url: URL, masked: str) -> Engine:
    try:
        return create_engine(url)
    except exc.NoSuchModuleError:
        raise DoctorError(
            f"{masked}: SQLAlchemy has no dialect or driver {url.drivername!r}; "
            "use e.g. postgresql+psycopg://, mysql+pymysql://, mariadb+pymysql:// "
            "or sqlite:///"
        ) from None
    except ImportError as error:
        module = (error.name or "").split(".")[0] or url.get_driver_name()
        package = _PIP_PACKAGES.get(module, module)
        raise DoctorError(
            f"{masked}: the driver {module!r} for {url.drivername} is not "
            f"installed: pip install '{package}'"
        ) from None
    except exc.ArgumentError as error:
        raise DoctorError(f"{masked}: {str(error).splitlines()[0]}") from None


def _read(connection: Connection, opened: _SQLiteFile) -> tuple[str, list[Setting]]:
    dialect = connection.dialect
    try:
        if dialect.name == "postgresql":
            return "postgresql", _postgresql(connection)
        if dialect.name == "sqlite":
            return "sqlite", _sqlite(connection, opened)
        if dialect.name in ("mysql", "mariadb"):
            system = "mariadb" if getattr(dialect, "is_mariadb", False) else "mysql"
            return system, _mysql(connection)
        return dialect.name, _generic(connection)
    finally:
        connection.rollback()


def _run_async(url: URL, reader: Callable[[Connection], Any]) -> Any:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> Any:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(reader)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _engine_sqlite_file(engine: Engine) -> _SQLiteFile:
    """An engine's SQLite file, read through its own (the user's) connection."""
    if engine.dialect.name != "sqlite":
        return _SQLiteFile()
    path = _sqlite_file(engine.url)
    if path is None or not os.path.isfile(path):
        return _SQLiteFile()
    read_only = _uri_mode(engine.url) == "ro" or not os.access(path, os.W_OK)
    return _SQLiteFile(path, read_only)


def read_settings(target: str | Engine) -> list[Setting]:
    """Connect to *target* and read what affects read-after-write visibility.

    An :class:`Engine` is read as it is, with its listeners: a ``begin``
    listener that emits BEGIN on SQLite shows in the transaction control.
    """
    return list(read_report(target).settings)


def read_report(target: str | Engine) -> Report:
    """One database's report; :class:`DoctorError` with one line when it cannot."""
    if isinstance(target, Engine):
        masked = mask(target.url)
        try:
            with target.connect() as connection:
                system, settings = _read(connection, _engine_sqlite_file(target))
        except exc.DBAPIError as error:
            raise _connect_error(masked, target.url, error) from None
        return Report(masked, system, tuple(settings))
    masked = mask(target)
    try:
        url = make_url(target)
    except exc.ArgumentError:
        raise DoctorError(
            f"{masked!r} is not a database URL: expected dialect+driver://user:"
            "password@host:port/database, e.g. postgresql+psycopg://app@localhost/app"
            " or sqlite:///app.db"
        ) from None
    opened = _SQLiteFile()
    if url.get_backend_name() == "sqlite":
        url, opened = _sqlite_read_only_url(url, masked)
    engine = _engine(url, masked)

    def reader(connection: Connection) -> tuple[str, list[Setting]]:
        return _read(connection, opened)

    try:
        if engine.dialect.is_async:
            engine.dispose()
            system, settings = _run_async(url, reader)
        else:
            with engine.connect() as connection:
                system, settings = reader(connection)
    except exc.DBAPIError as error:
        raise _connect_error(masked, url, error) from None
    except OSError as error:  # asyncpg's refused connection is not wrapped
        where = f"{url.host or 'localhost'}" + (f":{url.port}" if url.port else "")
        raise DoctorError(
            f"{masked}: cannot reach the server: {error}; is the server running "
            f"and listening at {where}?"
        ) from None
    except ImportError as error:  # an async driver's own import, at connect
        module = (error.name or "").split(".")[0]
        package = _PIP_PACKAGES.get(module, module)
        raise DoctorError(
            f"{masked}: {module!r} is not installed: pip install '{package}'"
        ) from None
    finally:
        engine.dispose()
    return Report(masked, system, tuple(settings))


# -- printing --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Row:
    name: str
    values: tuple[str | None, ...]
    counted: bool
    """A setting that changes what a session reads differs: exit status 1."""

    @property
    def differs(self) -> bool:
        return len(set(self.values)) > 1


def _compare(reports: Sequence[Report]) -> list[_Row]:
    names: list[str] = []
    for report in reports:
        names.extend(s.name for s in report.settings if s.name not in names)
    rows = []
    for name in names:
        found = [
            next((s for s in report.settings if s.name == name), None)
            for report in reports
        ]
        values = tuple(s.value if s is not None else None for s in found)
        present = [s for s in found if s is not None]
        # A setting one database lacks is no difference in what it reads.
        counted = (
            len(present) > 1
            and all(s.affects_visibility for s in present)
            and len({s.value for s in present}) > 1
        )
        rows.append(_Row(name, values, counted))
    return rows


def _write_report(out: TextIO, report: Report) -> None:
    out.write(f"{report.url}\n")
    width = max(len(s.name) for s in report.settings)
    value_width = max(len(s.value) for s in report.settings)
    for setting in report.settings:
        out.write(
            f"  {setting.name:<{width}}  {setting.value:<{value_width}}  "
            f"{setting.meaning}\n"
        )


def _write_table(out: TextIO, reports: Sequence[Report], rows: list[_Row]) -> None:
    headers = ["", "setting", *(f"[{i}]" for i in range(1, len(reports) + 1))]
    table = [
        [
            "!" if row.counted else "~" if row.differs else " ",
            row.name,
            *(value if value is not None else "-" for value in row.values),
        ]
        for row in rows
    ]
    widths = [
        max(len(line[i]) for line in [headers, *table]) for i in range(len(headers))
    ]
    out.write("\nside by side:\n")
    for index, report in enumerate(reports, 1):
        out.write(f"  [{index}] {report.url}\n")
    for line in [headers, *table]:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        out.write("  ".join(cells).rstrip() + "\n")
    out.write(
        "\n! differs, and changes what a session reads (exit status 1)\n"
        "~ differs, but not in what a session reads, or exists on one side only "
        "(-): listed, not counted\n"
    )


def doctor(
    urls: Sequence[str],
    out: TextIO,
    err: TextIO | None = None,
    *,
    as_json: bool = False,
) -> int:
    """Print each database's settings; with several, a diff.

    Returns 0, 1 when a setting that changes what a session reads differs, or 2
    (after one line on *err*) when a database cannot be read.
    """
    errors = err if err is not None else sys.stderr
    reports: list[Report] = []
    for url in urls:
        try:
            reports.append(read_report(url))
        except DoctorError as error:
            errors.write(f"sessionguard doctor: {error}\n")
            return 2
        except Exception as error:  # noqa: BLE001 - a CLI answers in one line, always
            first = (str(error).strip().splitlines() or [""])[0]
            errors.write(
                f"sessionguard doctor: {mask(url)}: unexpected "
                f"{type(error).__name__}: {first}; please report this\n"
            )
            return 2
    rows = _compare(reports) if len(reports) > 1 else []
    status = 1 if any(row.counted for row in rows) else 0
    if as_json:
        document = {
            "databases": [report.to_dict() for report in reports],
            "differences": [
                {"name": row.name, "values": list(row.values), "counted": row.counted}
                for row in rows
                if row.differs
            ],
            "status": status,
        }
        out.write(json.dumps(document, indent=2) + "\n")
        return status
    for index, report in enumerate(reports):
        if index:
            out.write("\n")
        _write_report(out, report)
    if rows:
        _write_table(out, reports, rows)
    if status:
        out.write(
            "\na setting that changes what a session reads differs: the same code "
            "can read fresh data on one and stale data on the other\n"
        )
    return status
