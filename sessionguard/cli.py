"""
The ``sessionguard`` command.

``sessionguard demo`` plays the classic bug on an embedded SQLite database:
a session that outlives a request reads a row that another session changed.
``sessionguard doctor URL [URL ...]`` explains what in each database's
configuration affects read-after-write visibility, and diffs several.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog
from sqlalchemy import String, create_engine, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from . import GuardConfig, StaleRead, install_guard, request_context
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy.engine import Engine

    from ._config import LogLevel
    from ._guard import Guard

__all__ = ["main"]


class _DemoBase(DeclarativeBase):
    pass


class Account(_DemoBase):
    """The demo's one table: an account whose owner another session renames."""

    __tablename__ = "sessionguard_demo_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(50))
    balance: Mapped[int]


def _use_colour(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """
    Colour or not, by the conventions users already set.

    ``NO_COLOR`` present and non-empty turns it off (no-color.org), else
    ``FORCE_COLOR`` present and non-empty turns it on, else a terminal gets it.
    """
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def _configure_logging(stream: TextIO) -> None:
    colors = _use_colour(stream)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=colors),
        ],
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def _heading(out: TextIO, text: str) -> None:
    out.write(f"\n== {text}\n")
    out.flush()


def _reset(engine: Engine) -> None:
    _DemoBase.metadata.drop_all(engine)
    _DemoBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Account(id=1, owner="alice", balance=100))
        session.commit()


def _rename_elsewhere(writer: Engine, owner: str) -> None:
    with Session(writer) as other:
        other.execute(update(Account).where(Account.id == 1).values(owner=owner))
        other.commit()


_READ_IN_REQUEST_2 = "request 2's select(Account).where(Account.id == 1)"
_SHARED_SESSION_HELP = (
    "   (shared_session: one Session served request-1 and then request-2. Its "
    "identity map carried request 1's Account object into request 2, which is "
    "how request 2 can be handed a row as it was before another session "
    "changed it.)\n"
)


def _play(
    out: TextIO, engine: Engine, writer: Engine, guard: Guard, renamed_to: str
) -> str:
    """Two requests share one session; between them, another session renames."""
    shared = Session(engine, expire_on_commit=False)
    with request_context("request-1"):
        account = shared.get(Account, 1)
        assert account is not None
        out.write(f"request 1 reads owner={account.owner!r}\n")
        shared.commit()
    _rename_elsewhere(writer, renamed_to)
    out.write(f"another session renames the owner to {renamed_to!r} and commits\n")
    with request_context("request-2"):
        seen = shared.scalars(select(Account).where(Account.id == 1)).one().owner
        if any(f.kind == "shared_session" for f in guard.findings):
            out.write(_SHARED_SESSION_HELP)
        out.write(f"request 2 reads owner={seen!r}\n")
        shared.commit()
    shared.close()
    del account
    return seen


def _demo(out: TextIO, database_url: str | None, verbose: bool = False) -> int:
    _configure_logging(out)
    # The per-transaction lines (session.begin/commit) only when asked.
    log_level: LogLevel = "debug" if verbose else "info"
    with tempfile.TemporaryDirectory(prefix="sessionguard-demo-") as directory:
        url = database_url or f"sqlite:///{Path(directory) / 'demo.sqlite'}"
        engine = create_engine(url)
        writer = create_engine(url)
        try:
            _reset(engine)
            out.write(f"sessionguard {__version__} demo on {engine.url!r}\n")

            _heading(out, "1. The classic bug, caught: a session outlives its request")
            guard = install_guard(
                engine, config=GuardConfig(log_values=True, log_level=log_level)
            )
            seen = _play(out, engine, writer, guard, "bob")
            stale = [f for f in guard.findings if isinstance(f, StaleRead)]
            if seen == "alice" and stale:
                finding = stale[0]
                diff = finding.attributes[0]
                where = Path(finding.location or "?").name
                out.write(
                    f"-> STALE: {finding.subject}: attribute `{diff.name}` was "
                    f"{diff.cached!r} in the identity map, {diff.current!r} in the "
                    f"database; read by {_READ_IN_REQUEST_2} ({where})\n"
                )
            first_stats = guard.stats()
            guard.uninstall()

            _heading(out, "2. The same flow with expire={'request'}: fresh data")
            _reset(engine)
            guard = install_guard(
                engine, log_values=True, expire={"request"}, log_level=log_level
            )
            seen_fresh = _play(out, engine, writer, guard, "carol")
            out.write(
                f"-> request 2 read {seen_fresh!r}; stale reads: "
                f"{guard.stats().stale_reads}\n"
            )
            second_stats = guard.stats()
            guard.uninstall()

            _heading(
                out,
                "3. expire={'commit'} for a session with expire_on_commit=False",
            )
            _reset(engine)
            guard = install_guard(engine, expire={"commit"}, log_level=log_level)
            with Session(engine, expire_on_commit=False) as session:
                account = session.get(Account, 1)
                assert account is not None
                account.balance += 10
                session.commit()
                out.write(
                    f"after commit the identity map holds {len(session.identity_map)} "
                    f"object(s), all expired: "
                    f"{'balance' not in account.__dict__}\n"
                )
            third_stats = guard.stats()
            guard.uninstall()

            _heading(out, "Summary")
            for title, stats in (
                ("1. caught", first_stats),
                ("2. expire on request", second_stats),
                ("3. expire on commit", third_stats),
            ):
                out.write(
                    f"{title:22} transactions={stats.transactions} "
                    f"statements={stats.statements} "
                    f"identity_map_hits={stats.identity_map_hits} "
                    f"stale_reads={stats.stale_reads} "
                    f"expire_all_calls={stats.expire_all_calls} "
                    f"max_identity_map_size={stats.max_identity_map_size}\n"
                )
            ok = (
                seen == "alice"
                and first_stats.stale_reads >= 1
                and seen_fresh == "carol"
                and second_stats.stale_reads == 0
            )
            out.write("demo OK\n" if ok else "demo FAILED: unexpected outcome\n")
            return 0 if ok else 1
        finally:
            engine.dispose()
            writer.dispose()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionguard",
        description="See and prevent stale reads from SQLAlchemy's identity map.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="play the classic stale-read bug and its fix on SQLite"
    )
    demo.add_argument(
        "--database-url",
        default=None,
        help="a SQLAlchemy URL to use instead of a temporary SQLite file "
        "(the demo creates and drops its own table)",
    )
    demo.add_argument(
        "--verbose",
        action="store_true",
        help="also show the per-transaction lines (session.begin, session.commit, "
        "expire_all): the guard's log_level='debug'",
    )
    doctor = commands.add_parser(
        "doctor",
        help="explain what in each database's configuration affects what a "
        "session reads; with several URLs, diff them (exit 1 on a difference "
        "that matters)",
        description="Explain what in each database's configuration affects what "
        "a session reads (isolation level, snapshot behaviour, read-only, ...), "
        "one line each; with several URLs, a side-by-side diff. Nothing is "
        "created or changed: SQLite files are opened read-only.",
        epilog="exit status:\n"
        "  0  read; no setting that changes what a session reads differs\n"
        "  1  a setting that changes what a session reads (isolation level in\n"
        "     effect, snapshot behaviour, read-only) differs between the URLs;\n"
        "     settings that exist on one side only are listed, not counted\n"
        "  2  a bad URL, a missing driver, a refused connection or login, a\n"
        "     missing SQLite file: one line on stderr",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.add_argument("urls", nargs="+", metavar="URL", help="SQLAlchemy URLs")
    doctor.add_argument(
        "--json", action="store_true", help="print the same facts as JSON"
    )
    return parser


def main(argv: Sequence[str] | None = None, out: Any = None, err: Any = None) -> int:
    """Run the command line; returns the exit status."""
    arguments = _parser().parse_args(argv)
    stream: TextIO = out if out is not None else sys.stdout
    if arguments.command == "demo":
        return _demo(stream, arguments.database_url, arguments.verbose)
    if arguments.command == "doctor":
        from ._doctor import doctor

        return doctor(arguments.urls, stream, err, as_json=arguments.json)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
