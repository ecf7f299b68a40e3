"""The sessionguard command's demo, run for real (doctor: tests/test_doctor.py)."""

from __future__ import annotations

import io
import subprocess
import sys

from sessionguard.cli import main


def test_demo_shows_the_bug_caught_then_fixed():
    """The demo reads a stale value, reports it, then reads fresh data with expiry."""
    out = io.StringIO()
    assert main(["demo"], out=out) == 0
    printed = out.getvalue()
    assert "request 2 reads owner='alice'" in printed  # the bug, really returned
    assert "stale_read" in printed
    assert "-> STALE: Account (1,) attribute 'owner' was 'alice'" in printed
    assert "request 2 reads owner='carol'" in printed  # with expire={'request'}
    assert "demo OK" in printed


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
