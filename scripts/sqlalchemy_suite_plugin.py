"""
pytest plugin for ``scripts/sqlalchemy-suite``: SQLAlchemy's own suite under a guard.

Loaded with ``-p sqlalchemy_suite_plugin`` (``scripts/`` on ``PYTHONPATH``) into a
run of SQLAlchemy's ``test/orm`` and ``test/ext`` from its sdist. It does three
things, each switched on by its own option:

``--sg-outcomes PATH``
    Record the outcome of every test (and the first line of its error) as JSON.
    Written by the process that sees every report: the xdist controller, or the
    only process without xdist.

``--sg-only PATH``
    Run only the test ids listed in PATH (one a line), for a baseline of the
    tests that failed under a guard.

``--sg-guard-rate RATE`` (with ``--sg-guard-dir DIR``)
    Install ``install_guard(None, sample_rate=RATE)`` on every session in each
    process that runs tests. SQLAlchemy's fixtures remove ORM listeners between
    tests (``SessionEvents._clear()`` and friends), so before each test's setup
    and again before its call the plugin checks the guard's listeners and, when
    they are gone, uninstalls the guard and installs a fresh one. It counts every
    reinstall and what was missing, and whether ``guard.installed`` still said
    True: that is reported, not hidden. The guard's verification SELECTs (execution
    option ``sessionguard_verification``) are removed from what SQLAlchemy's SQL
    assertions (``assertsql.assert_engine``, behind ``assert_sql_count``,
    ``assert_statement_count``, ``assert_sql_execution``, ``CountStatements``)
    observe. At the end each process writes ``DIR/<worker>.json`` with the summed
    ``GuardStats`` of its guards and the guard's log events (``internal_error``
    grouped by where and error).

Every process also refuses to run when ``sqlalchemy`` would be imported from
the sdist under test rather than from the installed package.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sessionguard import Guard

# Kept in step with sessionguard._stale.VERIFICATION_OPTION (read from there
# when it exists).
_VERIFICATION_OPTION = "sessionguard_verification"
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sqlalchemy-suite", "sessionguard: SQLAlchemy's suite")
    group.addoption("--sg-outcomes", metavar="PATH", help="write outcomes as JSON")
    group.addoption(
        "--sg-guard-rate",
        metavar="RATE",
        type=float,
        help="install a guard on every session with this sample_rate",
    )
    group.addoption(
        "--sg-guard-dir", metavar="DIR", help="where each process writes its stats"
    )
    group.addoption(
        "--sg-only", metavar="PATH", help="run only the test ids listed in PATH"
    )


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return _ADDRESS.sub("0x…", line.strip())[:300]
    return ""


def _short_path(path: str) -> str:
    """A path from the package or test tree down, not the machine's."""
    if "/site-packages/" in path:
        return path.rsplit("/site-packages/", 1)[1]
    if path.startswith("lib/"):
        # a compiled module names its source as it was when the wheel was built
        return path.removeprefix("lib/")
    parts = path.split("/test/")
    return f"test/{parts[-1]}" if len(parts) > 1 else path


def _error_of(report: pytest.TestReport) -> str:
    """``ExceptionType: first line of the message`` of a failed report."""
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        error = _first_line(crash.message)
        if ":" not in error:
            # A bare `assert` says nothing; where it failed tells the groups apart.
            error += f" at {_short_path(str(crash.path))}:{crash.lineno}"
        return error
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return _first_line(str(longrepr[2]))
    # No crash location (every frame hidden): the last line that looks like
    # an exception.
    lines = [line for line in report.longreprtext.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Warning|Exit)\b", line):
            return _first_line(line)
    return _first_line(lines[-1]) if lines else "(no message)"


class OutcomeRecorder:
    """Folds the setup/call/teardown reports of each test into one outcome."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.outcomes: dict[str, dict[str, str]] = {}

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.outcomes.setdefault(report.nodeid, {"outcome": "passed"})
        if report.when == "call" and hasattr(report, "wasxfail"):
            entry["outcome"] = "xpassed" if report.passed else "xfailed"
            return
        if report.skipped:
            if entry["outcome"] == "passed":
                entry["outcome"] = "skipped"
                entry["error"] = _error_of(report)
            return
        if report.failed and entry["outcome"] not in {"failed", "error"}:
            # A failure in setup or teardown is pytest's "error".
            entry["outcome"] = "failed" if report.when == "call" else "error"
            entry["when"] = report.when
            entry["error"] = _error_of(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.outcomes, indent=0, sort_keys=True))


class _EventCollector:
    """A structlog processor that counts the guard's events and drops them."""

    # Tests named per kind of finding or error, enough to reproduce one.
    EXAMPLES = 5

    def __init__(self) -> None:
        self.events: collections.Counter[str] = collections.Counter()
        self.internal_errors: collections.Counter[str] = collections.Counter()
        # kind (an event name, or "internal_error: where: error") -> test ids
        self.tests: dict[str, list[str]] = {}
        self.nodeid = "(outside any test)"

    def __call__(self, logger: Any, method: str, event_dict: Any) -> Any:
        import structlog

        name = str(event_dict.get("event"))
        self.events[name] += 1
        kind = name
        if name == "internal_error":
            where = event_dict.get("where", "?")
            error = _first_line(str(event_dict.get("error", "")))
            kind = f"{where}: {error}"
            self.internal_errors[kind] += 1
        if method in {"warning", "error"}:
            # findings and errors, not the per-transaction chatter
            tests = self.tests.setdefault(kind, [])
            if len(tests) < self.EXAMPLES and self.nodeid not in tests:
                tests.append(self.nodeid)
        raise structlog.DropEvent


class GuardKeeper:
    """Keeps one process-wide guard installed across SQLAlchemy's fixtures."""

    def __init__(self, rate: float, directory: Path, worker: str) -> None:
        self.rate = rate
        self.directory = directory
        self.worker = worker
        self.collector = _EventCollector()
        self.guard: Guard | None = None
        self.totals: dict[str, int] = {}
        self.tests = 0
        self.reinstalls: collections.Counter[str] = collections.Counter()
        self.missing: collections.Counter[str] = collections.Counter()
        self.installed_but_missing = 0
        self.uninstall_errors: collections.Counter[str] = collections.Counter()
        self.hidden_statements = 0
        self.assertions_filtered = 0

    # -- the guard ----------------------------------------------------------

    def install(self) -> None:
        import structlog

        from sessionguard import install_guard

        logger = structlog.wrap_logger(None, processors=[self.collector])
        self.guard = install_guard(None, sample_rate=self.rate, logger=logger)

    def _missing(self, guard: Guard) -> list[str]:
        """What of the guard no longer listens (reads its bookkeeping if present)."""
        from sqlalchemy import event
        from sqlalchemy.orm import Mapper

        missing = []
        if not guard.installed:
            missing.append("installed is False")
        # Private bookkeeping of the current guard: [(weakref(target), name, fn)].
        for target_ref, identifier, function in getattr(guard, "_listeners", ()):
            target = target_ref()
            if target is not None and not event.contains(target, identifier, function):
                missing.append(f"{getattr(target, '__name__', 'target')}.{identifier}")
        stale = sys.modules.get("sessionguard._stale")
        hooks = getattr(stale, "_hooks", None)
        if getattr(hooks, "statement_users", getattr(hooks, "users", 0)):
            for identifier in ("load", "refresh"):
                function = getattr(stale, f"_on_{identifier}", None)
                if function is not None and not event.contains(
                    Mapper, identifier, function
                ):
                    missing.append(f"Mapper.{identifier}")
            hook = getattr(stale, "_guarded_identity_lookup", None)
            if hook is not None and getattr(hooks, "original_identity_lookup", None):
                from sqlalchemy.orm import Session

                if Session.__dict__.get("_identity_lookup") is not hook:
                    missing.append("Session._identity_lookup")
        return missing

    def ensure(self, phase: str) -> None:
        guard = self.guard
        if guard is None:
            self.install()
            return
        missing = self._missing(guard)
        if not missing:
            return
        self.reinstalls[phase] += 1
        self.missing.update(missing)
        if guard.installed:
            self.installed_but_missing += 1
        self._add_stats(guard)
        try:
            guard.uninstall()
        except Exception as error:  # noqa: BLE001 - counted and reported
            self.uninstall_errors[
                f"{type(error).__name__}: {_first_line(str(error))}"
            ] += 1
        self.install()
        if self.guard is guard:
            # install_guard() handed back the old guard: nothing was reinstalled.
            self.uninstall_errors["install_guard() returned the old guard"] += 1

    def _add_stats(self, guard: Guard) -> None:
        for name, value in dataclasses.asdict(guard.stats()).items():
            if not isinstance(value, int):
                continue
            if name.startswith("max_"):
                self.totals[name] = max(self.totals.get(name, 0), value)
            else:
                self.totals[name] = self.totals.get(name, 0) + value

    # -- hiding the verification SELECT from SQL assertions -------------------

    def patch_assertsql(self) -> None:
        from sqlalchemy.testing import assertsql

        try:
            from sessionguard._stale import VERIFICATION_OPTION as option
        except ImportError:
            option = _VERIFICATION_OPTION
        original = assertsql.assert_engine
        keeper = self

        @contextlib.contextmanager
        def assert_engine(engine: Any) -> Iterator[Any]:
            with original(engine) as asserter:
                try:
                    yield asserter
                finally:
                    observed = asserter.accumulated
                    kept = [
                        obs
                        for obs in observed
                        if not (
                            obs.context is not None
                            and obs.context.execution_options.get(option)
                        )
                    ]
                    if len(kept) != len(observed):
                        keeper.hidden_statements += len(observed) - len(kept)
                        keeper.assertions_filtered += 1
                        observed[:] = kept

        assertsql.assert_engine = assert_engine

    # -- hooks ----------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.tests += 1
        self.collector.nodeid = item.nodeid
        self.ensure("setup")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        self.ensure("call")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self) -> None:
        guard = self.guard
        if guard is not None:
            self._add_stats(guard)
            with contextlib.suppress(Exception):
                guard.uninstall()
        import sqlalchemy

        report = {
            "worker": self.worker,
            "sample_rate": self.rate,
            "sqlalchemy": sqlalchemy.__version__,
            "tests": self.tests,
            "stats": self.totals,
            "events": dict(self.collector.events),
            "internal_errors": dict(self.collector.internal_errors),
            "examples": self.collector.tests,
            "reinstalls": dict(self.reinstalls),
            "missing": dict(self.missing),
            "installed_but_missing": self.installed_but_missing,
            "uninstall_errors": dict(self.uninstall_errors),
            "hidden_statements": self.hidden_statements,
            "assertions_filtered": self.assertions_filtered,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.worker}.json"
        path.write_text(json.dumps(report, indent=1, sort_keys=True))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    only = config.getoption("sg_only")
    if not only:
        return
    wanted = set(Path(only).read_text().splitlines())
    deselected = [item for item in items if item.nodeid not in wanted]
    if deselected:
        items[:] = [item for item in items if item.nodeid in wanted]
        config.hook.pytest_deselected(items=deselected)


def _check_installed_sqlalchemy(config: pytest.Config) -> None:
    import sqlalchemy

    where = Path(sqlalchemy.__file__).resolve()
    if where.is_relative_to(config.rootpath.resolve()):
        raise pytest.UsageError(
            f"sqlalchemy is imported from the sdist under test ({where}), not from "
            "the installed package: set PYTHONNOUSERSITE=1 (see the sdist's "
            "test/conftest.py)"
        )


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    outcomes = config.getoption("sg_outcomes")
    worker = getattr(config, "workerinput", {}).get("workerid")
    if outcomes and worker is None:
        config.pluginmanager.register(OutcomeRecorder(Path(outcomes)), "sg-outcomes")
    rate = config.getoption("sg_guard_rate")
    runs_tests = worker is not None or config.getoption("dist", "no") == "no"
    if rate is not None and runs_tests:
        directory = config.getoption("sg_guard_dir")
        if not directory:
            raise pytest.UsageError("--sg-guard-rate needs --sg-guard-dir")
        keeper = GuardKeeper(rate, Path(directory), worker or "main")
        config.pluginmanager.register(keeper, "sg-guard")


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # After SQLAlchemy's own plugin has set up sqlalchemy.testing, before
    # collection imports the test modules (some import assert_engine by name).
    _check_installed_sqlalchemy(session.config)
    keeper = session.config.pluginmanager.get_plugin("sg-guard")
    if isinstance(keeper, GuardKeeper):
        keeper.patch_assertsql()
        keeper.install()
