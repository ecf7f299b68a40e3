"""The sessionguard command: demo and doctor, run for real."""

from __future__ import annotations

import io
import subprocess
import sys

from sqlalchemy import create_engine, text

from sessionguard.cli import _use_colour, main


def test_demo_shows_the_bug_caught_then_fixed():
    """The demo reads a stale value, reports it, then reads fresh data with expiry."""
    out = io.StringIO()
    assert main(["demo"], out=out) == 0
    printed = out.getvalue()
    assert "request 2 reads owner='alice'" in printed  # the bug, really returned
    assert "stale_read" in printed
    assert (
        "-> STALE: Account 1: attribute `owner` was 'alice' in the identity map, "
        "'bob' in the database; read by request 2's select(Account)"
    ) in printed
    assert "request 2 reads owner='carol'" in printed  # with expire={'request'}
    assert "demo OK" in printed
    # The first shared_session finding is explained, once.
    assert printed.count("(shared_session: one Session served request-1") == 1
    # Quiet by default: no per-transaction lines without --verbose.
    assert "session.begin" not in printed


def test_demo_verbose_shows_the_per_transaction_lines():
    """--verbose turns on the guard's debug lines: session.begin/commit, expire_all."""
    out = io.StringIO()
    assert main(["demo", "--verbose"], out=out) == 0
    printed = out.getvalue()
    assert "session.begin" in printed
    assert "session.commit" in printed
    assert "expire_all" in printed


def test_colour_follows_no_color_and_force_color():
    """NO_COLOR (non-empty) turns colour off, FORCE_COLOR on, else a terminal decides."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert _use_colour(Terminal(), {}) is True
    assert _use_colour(io.StringIO(), {}) is False
    assert _use_colour(Terminal(), {"NO_COLOR": "1"}) is False
    assert _use_colour(Terminal(), {"NO_COLOR": ""}) is True  # empty: not set
    assert _use_colour(io.StringIO(), {"FORCE_COLOR": "1"}) is True
    assert _use_colour(Terminal(), {"NO_COLOR": "1", "FORCE_COLOR": "1"}) is False


def test_demo_output_has_no_escape_codes_with_no_color(monkeypatch):
    """The demo's log lines carry no ANSI colour under NO_COLOR, even with FORCE_COLOR."""
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("FORCE_COLOR", "1")
    out = io.StringIO()
    assert main(["demo"], out=out) == 0
    assert "\x1b[" not in out.getvalue()
    monkeypatch.delenv("NO_COLOR")
    out = io.StringIO()
    assert main(["demo"], out=out) == 0
    assert "\x1b[" in out.getvalue()


def test_console_script_runs_the_demo():
    """The installed console script runs and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "sessionguard.cli", "demo"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "demo OK" in done.stdout


def test_doctor_explains_one_database(sqlite_db):
    """doctor prints each visibility-relevant setting with one line of meaning."""
    out = io.StringIO()
    assert main(["doctor", sqlite_db.url], out=out) == 0
    printed = out.getvalue()
    assert "journal_mode: delete" in printed
    assert "isolation level (this connection): SERIALIZABLE" in printed


def test_doctor_diff_exits_1_on_a_visibility_difference(tmp_path):
    """Two SQLite files in different journal modes differ in what matters: exit 1."""
    wal = tmp_path / "wal.sqlite"
    engine = create_engine(f"sqlite:///{wal}")
    with engine.connect() as connection:
        connection.execute(text("PRAGMA journal_mode=wal"))
    engine.dispose()
    out = io.StringIO()
    status = main(
        ["doctor", f"sqlite:///{tmp_path / 'plain.sqlite'}", f"sqlite:///{wal}"],
        out=out,
    )
    assert status == 1
    assert "! journal_mode" in out.getvalue()


def test_doctor_same_settings_exit_0(tmp_path):
    """Two databases with the same relevant settings: exit 0."""
    out = io.StringIO()
    urls = [f"sqlite:///{tmp_path / 'a.sqlite'}", f"sqlite:///{tmp_path / 'b.sqlite'}"]
    assert main(["doctor", *urls], out=out) == 0


def test_doctor_on_postgresql_tells_the_truth_about_synchronous_commit(pg_url):
    """On PostgreSQL doctor says synchronous_commit is durability, not visibility."""
    out = io.StringIO()
    url = pg_url.replace("postgresql://", "postgresql+psycopg://")
    assert main(["doctor", url], out=out) == 0
    printed = out.getvalue()
    assert "default_transaction_isolation: read committed" in printed
    assert "never changes what other sessions see" in printed
    assert "transaction_read_only: off" in printed
