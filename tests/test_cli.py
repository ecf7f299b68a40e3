"""The sessionguard command's demo, run for real (doctor: tests/test_doctor.py)."""

from __future__ import annotations

import io
import subprocess
import sys

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
