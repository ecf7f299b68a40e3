"""examples/sqlmodel_app: its suite run under sessionguard, both ways, on PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sqlmodel_app"
STALE_TEST = "tests/test_support.py::test_support_tool_renames_a_hero"
TESTS = 37


@pytest.fixture
def example(pytester: pytest.Pytester, pg_url: str, monkeypatch) -> pytest.Pytester:
    """The example copied into pytester's directory, on a database of its own."""
    for module in ("fastapi", "httpx", "sqlmodel", "asyncpg"):
        pytest.importorskip(module, reason=f"!!! SKIPPED, NOT TESTED: no {module}")
    shutil.copytree(
        EXAMPLE,
        pytester.path,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"),
    )
    name = f"sg_example_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        make_url(pg_url).set(drivername="postgresql+psycopg"),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    url = make_url(pg_url).set(drivername="postgresql+asyncpg", database=name)
    for variable in list(os.environ):
        if variable.startswith(("SESSIONGUARD", "PYTEST_XDIST")):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
    monkeypatch.setenv("COLUMNS", "100")
    yield pytester
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def _run(example: pytest.Pytester, *args: str) -> pytest.RunResult:
    return example.runpytest_subprocess("-p", "no:cacheprovider", *args)


def test_report_mode_finds_only_the_stale_test(example, monkeypatch):
    """SESSIONGUARD=report: all 37 pass, one finding, in the test that reads stale data."""
    monkeypatch.setenv("SESSIONGUARD", "report")
    result = _run(example, "--sessionguard-report=report.json")
    result.assert_outcomes(passed=TESTS)
    result.stdout.fnmatch_lines(
        [
            "sessionguard report: 1 finding(s) (1 stale read(s)) in 1 test(s)",
            STALE_TEST,
            "  [[]call] stale_read Hero 1: attribute `name` differs * at *app.py:*",
        ]
    )
    report = json.loads((example.path / "report.json").read_text())
    assert [(f["nodeid"], f["kind"]) for f in report["findings"]] == [
        (STALE_TEST, "stale_read")
    ]
    [finding] = report["findings"]
    assert finding["identity"] == [1]
    assert [diff["name"] for diff in finding["attributes"]] == ["name"]


def test_strict_mode_fails_exactly_the_stale_test_briefly(example, monkeypatch):
    """SESSIONGUARD=1: only that test fails; its failure names test line, entity, key, attribute in < 25 lines."""
    monkeypatch.setenv("SESSIONGUARD", "1")
    result = _run(example, "-rf")
    result.assert_outcomes(passed=TESTS - 1, failed=1)
    result.stdout.fnmatch_lines(
        [f"FAILED {STALE_TEST} - sessionguard.exceptions.Stale*"]
    )
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if "= FAILURES =" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("E   "))
    failure = lines[start : end + 1]
    assert len(failure) < 25, "\n".join(failure)
    text_ = "\n".join(failure)
    assert "tests/test_support.py:9" in text_  # the test's line
    assert "stale read of Hero 1 at " in text_  # entity and key
    assert "attribute `name` differs from the database row" in text_
    assert "site-packages" not in text_ and "sessionguard/_" not in text_


def test_without_sessionguard_the_stale_read_goes_unnoticed(example):
    """Off: the whole suite passes, the stale read included."""
    result = _run(example)
    result.assert_outcomes(passed=TESTS)
