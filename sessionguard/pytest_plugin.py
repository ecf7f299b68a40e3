"""
pytest plugin: ``SESSIONGUARD=1`` makes stale reads fail the test that did them.

Registered through the ``pytest11`` entry point as ``sessionguard`` and inert
until enabled by ``--sessionguard=MODE``, else the ``SESSIONGUARD`` environment
variable, else the ``sessionguard`` ini option. Enabled, it installs one
process-wide guard in ``pytest_configure`` (before collection), attributes
every finding to the test and phase that was running when it was made, and:

- ``strict``: fails the phase of a test during which a stale read happened,
  even when the ``StaleReadError`` was swallowed;
- ``report``: fails nothing and lists the findings in the terminal summary.

Under pytest-xdist each worker sends its findings and counters to the
controller once, at the end of its session, through ``workeroutput``.
See docs/testing.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from typing import TYPE_CHECKING, Any

import pytest

from ._config import GuardConfig, Mode, parse_mode
from ._findings import Finding, StaleRead, describe_attributes, render_key
from ._guard import Guard, GuardStats, _installed, install_guard
from ._location import is_user_file
from ._targets import resolve_target
from .exceptions import SessionGuardError, StaleReadError

if TYPE_CHECKING:
    from collections.abc import Generator, Iterator, Sequence
    from pathlib import Path

    from _pytest.fixtures import FixtureDef

__all__ = ["sessionguard"]

_INI = "sessionguard"
_ENV = "SESSIONGUARD"
_WORKER_KEY = "sessionguard"
_MARKER = (
    "sessionguard(allow_stale=False): allow_stale=True excuses this test's "
    "stale reads in sessionguard strict mode (they are still reported)"
)
_EXCUSE_HINT = (
    "A test that reads stale data on purpose can be excused with "
    "@pytest.mark.sessionguard(allow_stale=True)."
)
_DB_WORDS = (
    "db",
    "database",
    "session",
    "engine",
    "schema",
    "tables",
    "migrat",
    "conn",
)
_MISSING_TABLE = (
    re.compile(r"no such table: ([\w.\"`\[\]]+)"),  # SQLite
    re.compile(r'relation "([^"]+)" does not exist'),  # PostgreSQL UndefinedTable
    re.compile(r"Table '([^']+)' doesn't exist"),  # MySQL / MariaDB 1146
)


@dataclasses.dataclass(frozen=True)
class _Resolved:
    mode: Mode
    source: str
    """``option``, ``env``, ``ini`` or ``default``."""


@dataclasses.dataclass
class _Running:
    item: pytest.Item
    phase: str


class _State:
    """The plugin's state for one pytest process; lives in ``config.stash``."""

    def __init__(self, config: pytest.Config, resolved: _Resolved) -> None:
        self.config = config
        self.resolved = resolved
        self.guard: Guard | None = None
        self.records: list[dict[str, Any]] = []
        self.by_phase: dict[tuple[str, str], list[Finding]] = {}
        self.running: _Running | None = None
        self.lock = threading.Lock()
        self.worker_stats: list[dict[str, int]] = []

    @property
    def enabled(self) -> bool:
        return self.resolved.mode is not Mode.OFF

    @property
    def strict(self) -> bool:
        return self.resolved.mode is Mode.STRICT

    def on_finding(self, finding: Finding) -> None:
        """Guard callback: attribute *finding* to whatever test runs now."""
        # Read once: a test thread may move on while an app thread reports.
        running = self.running
        record = finding.to_dict()
        if running is None:
            record = {"nodeid": None, "phase": "session", **record}
            excused = False
        else:
            nodeid = running.item.nodeid
            excused = _allow_stale(running.item)
            record = {"nodeid": nodeid, "phase": running.phase, **record}
        record["excused"] = excused
        record["worker"] = _worker_id(self.config)
        with self.lock:
            self.records.append(record)
            if running is not None:
                key = (running.item.nodeid, running.phase)
                self.by_phase.setdefault(key, []).append(finding)

    def findings_of(self, nodeid: str, phase: str) -> list[Finding]:
        with self.lock:
            return list(self.by_phase.get((nodeid, phase), ()))

    def stats(self) -> dict[str, int]:
        """This process's counters, plus those the xdist workers sent."""
        local = self.guard.stats() if self.guard is not None else GuardStats()
        total = dataclasses.asdict(local)
        for stats in self.worker_stats:
            for name, value in stats.items():
                if name.startswith("max_"):
                    total[name] = max(total.get(name, 0), value)
                else:
                    total[name] = total.get(name, 0) + value
        return total


_STATE = pytest.StashKey[_State]()


def _worker_id(config: pytest.Config) -> str | None:
    workerinput = getattr(config, "workerinput", None)
    return None if workerinput is None else str(workerinput.get("workerid"))


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _state(config: pytest.Config) -> _State | None:
    state = config.stash.get(_STATE, None)
    return state if state is not None and state.enabled else None


def _allow_stale(item: pytest.Item) -> bool:
    marker = item.get_closest_marker("sessionguard")
    return bool(marker is not None and marker.kwargs.get("allow_stale", False))


# -- configuration ------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sessionguard", "stale reads from the identity map")
    group.addoption(
        "--sessionguard",
        dest="sessionguard",
        metavar="MODE",
        default=None,
        help=(
            "off, report or strict (aliases 0/false, 1/true/on). Overrides the "
            "SESSIONGUARD environment variable and the sessionguard ini option."
        ),
    )
    group.addoption(
        "--sessionguard-report",
        dest="sessionguard_report",
        metavar="PATH",
        default=None,
        help="write the findings and counters as JSON to PATH.",
    )
    parser.addini(
        _INI,
        "sessionguard mode when neither --sessionguard nor SESSIONGUARD is set: "
        "off, report or strict",
        default="",
    )


def _resolve(config: pytest.Config) -> _Resolved:
    option = config.getoption("sessionguard")
    if option is not None:
        return _Resolved(_parse(option, "--sessionguard"), "option")
    env = os.environ.get(_ENV, "")
    if env.strip():  # an empty variable counts as unset
        return _Resolved(_parse(env, "environment variable SESSIONGUARD"), "env")
    ini = str(config.getini(_INI) or "")
    if ini.strip():
        where = f" (set in {config.inipath})" if config.inipath else ""
        return _Resolved(_parse(ini, "ini option sessionguard", where), "ini")
    return _Resolved(Mode.OFF, "default")


def _parse(value: str, source: str, where: str = "") -> Mode:
    try:
        return parse_mode(value, source)
    except SessionGuardError as error:
        raise pytest.UsageError(f"{error}{where}") from None


def _guard_config(mode: Mode) -> GuardConfig:
    environ = dict(os.environ)
    # The mode may come from the option or ini: it decides on_stale's default.
    environ[_ENV] = mode.value
    overrides: dict[str, Any] = {}
    if not environ.get("SESSIONGUARD_LOG_LEVEL", "").strip():
        # pytest reports every finding (failure, section, summary): the
        # guard's own log lines would only repeat them in captured output.
        overrides["log_level"] = "error"
    try:
        return GuardConfig.from_env(environ, **overrides)
    except SessionGuardError as error:
        raise pytest.UsageError(f"sessionguard: {error}") from None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER)
    resolved = _resolve(config)
    state = _State(config, resolved)
    config.stash[_STATE] = state
    if not state.enabled:
        return
    guard_config = _guard_config(resolved.mode)
    try:
        guard = install_guard(None, config=guard_config)
    except SessionGuardError as error:
        raise pytest.UsageError(f"sessionguard: {error}") from None
    state.guard = guard
    guard._owner = "the sessionguard pytest plugin"
    guard._finding_callbacks = [*guard._finding_callbacks, state.on_finding]


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or state.guard is None:
        return
    guard = state.guard
    guard._finding_callbacks = [
        callback
        for callback in guard._finding_callbacks
        if callback != state.on_finding
    ]
    guard.uninstall()
    state.guard = None


def pytest_report_header(config: pytest.Config) -> str | None:
    state = config.stash.get(_STATE, None)
    if state is None:
        return None
    resolved = state.resolved
    source = "default" if resolved.source == "default" else f"from {resolved.source}"
    return f"sessionguard: {resolved.mode.value} ({source})"


# -- attribution ---------------------------------------------------------------


def _enter(item: pytest.Item, phase: str) -> None:
    state = _state(item.config)
    if state is not None:
        state.running = _Running(item, phase)
        if state.guard is not None:
            # An excused test runs as if the guard only reported. A flag on
            # the guard, not a context variable: the read may happen in an
            # app's thread (TestClient's portal, a worker pool).
            state.guard._raise_excused = _allow_stale(item)


def _check_marker(marker: pytest.Mark) -> None:
    if marker.args or set(marker.kwargs) - {"allow_stale"}:
        pytest.fail(
            "@pytest.mark.sessionguard takes only allow_stale=True or False, "
            f"not {marker.args!r} {marker.kwargs!r}",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    marker = item.get_closest_marker("sessionguard")
    if marker is not None and _state(item.config) is not None:
        _check_marker(marker)
    _enter(item, "setup")
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    _enter(item, "call")
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    _enter(item, "teardown")
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    try:
        return (yield)
    finally:
        state = _state(item.config)
        if state is not None:
            state.running = None  # later findings belong to no test
            if state.guard is not None:
                state.guard._raise_excused = False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    raised = _stale_read_error(call)
    if raised is not None and report.failed:
        _only_user_frames(item, call, report)
    state = _state(item.config)
    if state is None:
        return report
    findings = state.findings_of(item.nodeid, call.when)
    if raised is not None:
        # The failure already says it: list only what the exception does not.
        findings = [f for f in findings if f != raised.finding]
    if findings:
        _report_findings(state, item, report, findings)
    if report.failed and call.excinfo is not None:
        table = _missing_table(call.excinfo.value)
        if table is not None:
            report.sections.append(("sessionguard", _schema_help(item, table)))
    return report


def _stale_read_error(call: pytest.CallInfo[None]) -> StaleReadError | None:
    excinfo = call.excinfo
    if excinfo is not None and isinstance(excinfo.value, StaleReadError):
        return excinfo.value
    return None


def _only_user_frames(
    item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport
) -> None:
    """
    Show only the user's own frames in a StaleReadError's traceback.

    The reader needs the test's line and the app's line that read. The frames
    of sessionguard (hidden as ``__tracebackhide__`` would), SQLAlchemy and
    the web framework between them are noise: pytest's long format prints
    whole functions. ``--full-trace`` still shows everything.
    """
    original = getattr(item, "_traceback_filter", None)
    if (
        call.excinfo is None
        or original is None
        or item.config.getoption("fulltrace", False)
    ):
        return

    def user_frames(excinfo: pytest.ExceptionInfo[BaseException]) -> Any:
        traceback = original(excinfo)
        kept = [entry for entry in traceback if is_user_file(str(entry.path))]
        if not kept:
            return traceback
        if item.config.getoption("tbstyle", "auto") == "auto":
            # The test in full; the app's frames down to the read one line
            # each: the exception message already says what was read, where.
            kept = [
                entry.with_repr_style(None if index == 0 else "short")
                for index, entry in enumerate(kept)
            ]
        return type(traceback)(kept)

    try:
        # An instance attribute shadows the method for this one rendering.
        item.__dict__["_traceback_filter"] = user_frames
        report.longrepr = item.repr_failure(call.excinfo)
    except Exception:  # noqa: BLE001 - keep pytest's own rendering
        return
    finally:
        item.__dict__.pop("_traceback_filter", None)


def _report_findings(
    state: _State, item: pytest.Item, report: pytest.TestReport, findings: list[Finding]
) -> None:
    stale = [finding for finding in findings if isinstance(finding, StaleRead)]
    excused = _allow_stale(item)
    described = "\n\n".join(_describe(finding) for finding in findings)
    if state.strict and stale and not excused and report.passed:
        what = "; ".join(f.subject for f in stale)
        report.outcome = "failed"
        report.longrepr = (
            f"sessionguard strict: stale read during {report.when}: {what}. "
            "The test passed otherwise: the StaleReadError was caught or "
            f"never raised.\n\n{described}\n\n{_EXCUSE_HINT}"
        )
        return
    header = f"{len(findings)} finding(s) during {report.when}"
    if excused and stale:
        header += " (stale reads excused by @pytest.mark.sessionguard)"
    report.sections.append(("sessionguard", f"{header}:\n{described}"))


def _describe(finding: Finding) -> str:
    if isinstance(finding, StaleRead):
        return finding.describe()
    data = finding.to_dict()
    details = ", ".join(
        f"{key}={value!r}"
        for key, value in data.items()
        if key not in ("kind", "session_id", "location") and value not in (None, [], 0)
    )
    where = f" at {finding.location}" if finding.location else ""
    return f"{finding.kind}{where}: {details}"


# -- schema readiness ----------------------------------------------------------


def _missing_table(error: BaseException) -> str | None:
    """The table named by a missing-table error in *error*'s chain, if any."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        text = str(current)
        for pattern in _MISSING_TABLE:
            match = pattern.search(text)
            if match:
                return match.group(1).strip('"`[]')
        if type(current).__name__ == "UndefinedTable":
            return "(unknown)"
        orig = getattr(current, "orig", None)
        pending.extend(
            [
                current.__cause__,
                current.__context__,
                orig if isinstance(orig, BaseException) else None,
            ]
        )
    return None


def _fixture_names(manager: Any) -> set[str]:
    names: set[str] = set()
    # pytest 8 keeps _arg2fixturedefs; later versions index by node.
    for attribute in (
        "_arg2fixturedefs",
        "_arg2node2fixturedefs",
        "_arg2nodeid2fixturedefs",
    ):
        names.update(getattr(manager, attribute, {}) or {})
    return names


def _visible_defs(
    manager: Any, name: str, item: pytest.Item
) -> Sequence[FixtureDef[Any]]:
    try:
        defs = manager.getfixturedefs(name, item)
    except (TypeError, AttributeError):  # pytest 8.0 took a nodeid
        defs = manager.getfixturedefs(name, item.nodeid)
    return defs or ()


def _inactive_db_fixtures(item: pytest.Item) -> list[tuple[str, str, bool]]:
    """Database-looking fixtures visible to *item* that it did not use."""
    manager: Any = item.session._fixturemanager
    active = set(getattr(item, "fixturenames", ()))
    active.update(getattr(item, "funcargs", {}) or {})
    inactive = []
    for name in sorted(_fixture_names(manager)):
        lowered = name.lower()
        if name in active or name == "sessionguard":
            continue
        if not any(word in lowered for word in _DB_WORDS):
            continue
        defs = _visible_defs(manager, name, item)
        if not defs:
            continue
        definition = defs[-1]
        autouse = bool(getattr(definition, "_autouse", False))
        inactive.append((name, str(definition.scope), autouse))
    return inactive


def _schema_help(item: pytest.Item, table: str) -> str:
    lines = [
        f"The test failed on a missing table: {table!r}. The schema was not "
        "created (or not yet) for this test."
    ]
    inactive = _inactive_db_fixtures(item)
    if inactive:
        lines.append(
            "These database fixtures are defined for this test but were not "
            "active for it:"
        )
        lines.extend(
            f"  {name} (scope={scope}, autouse={autouse})"
            for name, scope, autouse in inactive
        )
        lines.append(
            "A schema fixture with autouse=False runs only for the tests that "
            "request it, so a test that does not (or that runs first, alone or "
            "on another xdist worker) finds no tables: that is why it passes "
            "locally and fails in CI. Make the schema fixture autouse=True, or "
            "request it from the fixture that hands out engines or sessions."
        )
    else:
        lines.append(
            "No inactive database fixture was found: check that the schema is "
            "created (create_all() or migrations) before the first test uses it."
        )
    return "\n".join(lines)


# -- xdist ------------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    state = _state(config)
    if state is None:
        return
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        with state.lock:
            records = list(state.records)
        workeroutput[_WORKER_KEY] = json.dumps(
            {"findings": records, "stats": state.stats()}
        )
        return
    path = config.getoption("sessionguard_report")
    if path:
        _write_report(state, config.invocation_params.dir / path)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: merge what a finished worker sent, exactly once."""
    state = _state(node.config)
    output = getattr(node, "workeroutput", None) or {}
    payload = output.pop(_WORKER_KEY, None)
    if state is None or payload is None:
        return
    data = json.loads(payload)
    with state.lock:
        state.records.extend(data["findings"])
    state.worker_stats.append(data["stats"])


# -- reporting ----------------------------------------------------------------------


def _write_report(state: _State, path: Path) -> None:
    with state.lock:
        records = list(state.records)
    payload = {
        "mode": state.resolved.mode.value,
        "findings": records,
        "stats": state.stats(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = _state(config)
    if state is None or _is_worker(config):
        return
    with state.lock:
        records = list(state.records)
    stats = state.stats()
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", "sessionguard")
    stale = sum(1 for record in records if record["kind"] == "stale_read")
    tests = {record["nodeid"] for record in records if record["nodeid"]}
    write(
        f"sessionguard {state.resolved.mode.value}: {len(records)} finding(s) "
        f"({stale} stale read(s)) in {len(tests)} test(s)"
    )
    for nodeid, group in _grouped(records):
        write(nodeid if nodeid is not None else "(outside any test)")
        for record in group:
            write("  " + _summary_line(record))
    write(
        f"largest identity map: {stats['max_identity_map_size']} object(s); "
        f"{stats['transactions']} transaction(s), {stats['statements']} "
        f"statement(s), {stats['identity_map_hits']} identity-map hit(s), "
        f"{stats['verified_objects']} verified"
    )
    path = config.getoption("sessionguard_report")
    if path:
        write(f"JSON report: {config.invocation_params.dir / path}")


def _grouped(
    records: list[dict[str, Any]],
) -> Iterator[tuple[str | None, list[dict[str, Any]]]]:
    groups: dict[str | None, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["nodeid"], []).append(record)
    yield from sorted(groups.items(), key=lambda pair: pair[0] or "")


def _summary_line(record: dict[str, Any]) -> str:
    kind = record["kind"]
    where = f" at {record['location']}" if record.get("location") else ""
    excused = " (excused)" if record.get("excused") else ""
    if kind == "stale_read":
        what = describe_attributes(
            [f"`{diff['name']}`" for diff in record.get("attributes", [])],
            bool(record.get("deleted")),
        )
        return (
            f"[{record['phase']}] stale_read {record['entity']} "
            f"{render_key(record['identity'])}: {what}{where}{excused}"
        )
    return f"[{record['phase']}] {kind}{where}"


# -- fixture and marker -------------------------------------------------------------


@pytest.fixture
def sessionguard(request: pytest.FixtureRequest) -> Iterator[Guard]:
    """
    The plugin's guard when sessionguard is enabled.

    Otherwise a guard on every session installed for this test and uninstalled
    after it (or the guard some other code already installed on every session).
    """
    state = _state(request.config)
    if state is not None and state.guard is not None:
        yield state.guard
        return
    already = _installed.get(resolve_target(None).key)
    guard = already or install_guard(None)
    try:
        yield guard
    finally:
        if already is None:
            guard.uninstall()
