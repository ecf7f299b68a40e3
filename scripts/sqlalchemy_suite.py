"""
Run SQLAlchemy's own ``test/orm`` and ``test/ext`` without and with a guard.

The runner behind ``scripts/sqlalchemy-suite`` (which sets up the virtual
environment first; run that). It downloads the sdist of the *installed*
SQLAlchemy, runs the suites from it against the installed package, once as a
baseline and once per sample rate with ``install_guard(None, sample_rate=R)``
on every session (``scripts/sqlalchemy_suite_plugin.py``), and prints every test
whose outcome differs from the baseline, grouped by error.

Expected differences live in ``scripts/sqlalchemy-suite-expected.txt``, each
with its reason. Exit status: 0 when every difference (and every kind of
``internal_error``) is listed there and no listed entry is stale, 1 when not,
2 when the run itself could not be made (download, pytest usage error, ...).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
EXPECTED = SCRIPTS / "sqlalchemy-suite-expected.txt"
FAILED = frozenset({"failed", "error"})


class SetupError(Exception):
    """The run could not be made: exit status 2."""


# -- expected differences -----------------------------------------------------


@dataclasses.dataclass
class Entry:
    """One line of the expected-differences file."""

    line: int
    pattern: str
    reason: str
    rates: frozenset[float] | None  # None: every sample rate
    internal_error: bool = False
    matched_rates: set[float] = dataclasses.field(default_factory=set)

    def applies(self, rate: float) -> bool:
        return self.rates is None or rate in self.rates

    def matches(self, text: str) -> bool:
        # Test ids hold brackets (parameters), which fnmatch reads as classes.
        return text == self.pattern or fnmatch.fnmatchcase(text, self.pattern)


def parse_expected(path: Path) -> list[Entry]:
    """
    Read ``PATTERN [@RATE,...] | REASON`` lines (``#`` starts a comment).

    PATTERN is a test id or an fnmatch pattern over test ids, or
    ``internal_error:`` followed by a pattern over ``where: ExceptionType:
    message`` for the guard's own internal errors.
    """
    entries: list[Entry] = []
    if not path.exists():
        return entries
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        left, bar, reason = line.partition(" | ")
        if not bar or not reason.strip():
            raise SetupError(f"{path}:{number}: expected 'PATTERN | REASON': {raw!r}")
        left = left.strip()
        rates: frozenset[float] | None = None
        if " @" in left:
            left, _, rate_text = left.rpartition(" @")
            try:
                rates = frozenset(float(rate) for rate in rate_text.split(","))
            except ValueError:
                raise SetupError(
                    f"{path}:{number}: bad sample rates {rate_text!r} "
                    "(expected e.g. '@1.0' or '@1.0,0.0')"
                ) from None
        internal = left.startswith("internal_error:")
        if internal:
            left = left.removeprefix("internal_error:").strip()
        entries.append(
            Entry(number, left.strip(), reason.strip(), rates, internal_error=internal)
        )
    return entries


# -- the sdist ----------------------------------------------------------------


def ensure_sdist(cache: Path, version: str) -> tuple[Path, float | None]:
    """The unpacked sdist of *version* (downloaded once); and the seconds it took."""
    target = cache / f"sqlalchemy-{version}"
    marker = target / ".sessionguard-unpacked"
    if marker.exists():
        # resolved: pytest's test ids are relative to the rootdir, which it
        # resolves, while the files given are found through cwd
        return target.resolve(), None
    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # --no-binary for SQLAlchemy only: ":all:" would also build its build
        # dependencies (setuptools, Cython) from source, minutes for nothing.
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-binary",
            "sqlalchemy",
            f"sqlalchemy=={version}",
            "--dest",
            tmp,
        ]
        print(f"downloading the sdist: {' '.join(command[2:])}", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        archives = sorted(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise SetupError(
                f"pip download of sqlalchemy=={version} failed:\n{done.stderr[-3000:]}"
            )
        if target.exists():
            shutil.rmtree(target)
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archives[0]) as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(unpacked, filter="data")
            else:  # Python without PEP 706 (3.10 before 3.10.12)
                archive.extractall(unpacked)
        (top,) = unpacked.iterdir()
        if not (top / "test" / "conftest.py").exists():
            raise SetupError(f"{archives[0].name} has no test/conftest.py")
        top.rename(target)
    marker.write_text(version)
    return target.resolve(), time.monotonic() - started


# -- one pytest run -----------------------------------------------------------


@dataclasses.dataclass
class Run:
    label: str
    rate: float | None
    outcomes: dict[str, dict[str, str]]
    seconds: float
    log: Path
    guard: dict[str, Any] = dataclasses.field(default_factory=dict)
    cached: bool = False
    subset: int | None = None  # a subset baseline: how many tests it ran


def pytest_command(
    args: argparse.Namespace,
    sdist: Path,
    outcomes: Path,
    rate: float | None,
    guard_dir: Path,
    *,
    only: Path | None = None,
) -> list[str]:
    command = [sys.executable, "-m", "pytest"]
    if only is not None:
        # Test ids cannot be passed to pytest as arguments: SQLAlchemy renames
        # the classes of backend tests while collecting them. The plugin
        # deselects the others after collecting just their files.
        tests = only.read_text().splitlines()
        command += sorted({test.split("::")[0] for test in tests})
        command.append(f"--sg-only={only}")
    else:
        command += [f"test/{suite}" for suite in args.suites]
    command += [
        "-n",
        str(args.jobs),
        "-p",
        "no:cacheprovider",
        # the project's own plugin stays out of both runs
        "-p",
        "no:sessionguard",
        "-p",
        "sqlalchemy_suite_plugin",
        # SQLAlchemy's addopts stop at 250 failures
        "--maxfail=0",
        # SQLAlchemy reads its setup.cfg from the rootdir; with "--opt PATH" an
        # existing PATH would count as a test path in finding it.
        f"--rootdir={sdist}",
        f"--sg-outcomes={outcomes}",
    ]
    if rate is not None:
        command += [f"--sg-guard-rate={rate!r}", f"--sg-guard-dir={guard_dir}"]
    if args.k:
        command += ["-k", args.k]
    passthrough: list[str] = args.pytest_args
    return command + passthrough


def child_environment() -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        # a guard from the developer's shell would spoil the baseline
        if not name.startswith("SESSIONGUARD")
    }
    # SQLAlchemy's test/conftest.py puts the sdist's lib/ first on sys.path
    # unless user site-packages are off; the installed package is the one to
    # measure (the plugin checks it). The variable, unlike python -s, reaches
    # the xdist workers.
    env["PYTHONNOUSERSITE"] = "1"
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{SCRIPTS}{os.pathsep}{path}" if path else str(SCRIPTS)
    return env


def run_pytest(
    args: argparse.Namespace,
    sdist: Path,
    work: Path,
    label: str,
    rate: float | None,
    *,
    only: list[str] | None = None,
) -> Run:
    outcomes = work / f"{label}.outcomes.json"
    guard_dir = work / f"{label}.guard"
    log = work / f"{label}.log"
    for stale in (outcomes, log):
        stale.unlink(missing_ok=True)
    shutil.rmtree(guard_dir, ignore_errors=True)
    only_file = None
    if only is not None:
        only_file = work / f"{label}.tests.txt"
        only_file.write_text("".join(f"{nodeid}\n" for nodeid in only))
    command = pytest_command(args, sdist, outcomes, rate, guard_dir, only=only_file)
    print(f"{label}: running pytest (log: {log})", flush=True)
    started = time.monotonic()
    with log.open("w") as out:
        out.write(f"# cwd: {sdist}\n# {' '.join(command)}\n")
        out.flush()
        status = subprocess.run(
            command,
            cwd=sdist,
            env=child_environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    seconds = time.monotonic() - started
    # 0: all passed, 1: some failed; anything else means no usable run.
    if status not in (0, 1) or not outcomes.exists():
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-30:])
        raise SetupError(f"{label}: pytest exited with status {status}:\n{tail}")
    run = Run(label, rate, json.loads(outcomes.read_text()), seconds, log)
    if rate is not None:
        run.guard = merge_guard_reports(guard_dir)
    print(f"{label}: {summary(run.outcomes)} in {seconds:.0f} s", flush=True)
    return run


def merge_guard_reports(directory: Path) -> dict[str, Any]:
    """Sum the per-process reports of the plugin (one per xdist worker)."""
    merged: dict[str, Any] = {"workers": 0}
    counters = (
        "stats",
        "events",
        "internal_errors",
        "reinstalls",
        "missing",
        "uninstall_errors",
    )
    for name in counters:
        merged[name] = collections.Counter()
    for name in ("tests", "installed_but_missing", "hidden_statements"):
        merged[name] = 0
    examples: dict[str, list[str]] = {}
    for path in sorted(directory.glob("*.json")):
        report = json.loads(path.read_text())
        merged["workers"] += 1
        for kind, tests in report.get("examples", {}).items():
            examples.setdefault(kind, []).extend(tests)
        for name in counters:
            for key, value in report.get(name, {}).items():
                if key.startswith("max_"):
                    merged[name][key] = max(merged[name][key], value)
                else:
                    merged[name][key] += value
        for name in ("tests", "installed_but_missing", "hidden_statements"):
            merged[name] += report.get(name, 0)
    merged["examples"] = {kind: sorted(tests) for kind, tests in examples.items()}
    if not merged["workers"]:
        raise SetupError(f"no guard report in {directory}: did the plugin load?")
    return {k: dict(v) if isinstance(v, dict) else v for k, v in merged.items()}


# -- comparing ----------------------------------------------------------------


def suite_of(nodeid: str) -> str:
    parts = nodeid.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "test" else "?"


def summary(outcomes: dict[str, dict[str, str]]) -> str:
    counts = collections.Counter(entry["outcome"] for entry in outcomes.values())
    order = ["passed", "failed", "error", "skipped", "xfailed", "xpassed"]
    return ", ".join(f"{counts[name]} {name}" for name in order if counts[name])


def counts_by_suite(
    outcomes: dict[str, dict[str, str]],
) -> dict[str, collections.Counter[str]]:
    result: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    for nodeid, entry in outcomes.items():
        outcome = entry["outcome"]
        bucket = {"error": "failed", "xfailed": "skipped"}.get(outcome, outcome)
        result[suite_of(nodeid)][bucket] += 1
    return result


def difference(base: dict[str, str] | None, guarded: dict[str, str] | None) -> str:
    """The group a differing test belongs to."""
    if guarded is None:
        return "not run under the guard"
    if base is None:
        return "not run in the baseline"
    outcome = guarded["outcome"]
    if outcome in FAILED:
        where = "" if guarded.get("when", "call") == "call" else f"[{guarded['when']}] "
        return f"{where}{guarded.get('error', '(no message)')}"
    if base["outcome"] in FAILED:
        return f"passes only under the guard (baseline: {base.get('error', '')})"
    detail = f": {guarded['error']}" if guarded.get("error") else ""
    return f"{base['outcome']} without the guard, {outcome} with it{detail}"


def differing(base: Run, guarded: Run) -> dict[str, str]:
    """Test id -> group, for every test whose outcome is not the baseline's."""
    result = {}
    for nodeid in sorted(set(base.outcomes) | set(guarded.outcomes)):
        before = base.outcomes.get(nodeid)
        after = guarded.outcomes.get(nodeid)
        if before is None or after is None or before["outcome"] != after["outcome"]:
            result[nodeid] = difference(before, after)
    return result


# -- reporting ----------------------------------------------------------------


def print_counts(base: Run, guarded_runs: list[Run]) -> None:
    suites = sorted({suite_of(n) for n in base.outcomes})
    header = f"{'run':<22}{'suite':<7}{'passed':>8}{'failed':>8}{'skipped':>8}"
    print(f"{header}{'differ':>8}{'wall':>9}")
    for run in [base, *guarded_runs]:
        counts = counts_by_suite(run.outcomes)
        diffs = collections.Counter(
            suite_of(n) for n in (differing(base, run) if run is not base else {})
        )
        cached = " (kept)" if run.cached else ""
        if run.subset is not None:
            cached = f" ({run.subset} run)"
        for index, suite in enumerate(suites):
            count = counts[suite]
            wall = f"{run.seconds:>7.0f} s" if index == 0 else ""
            line = (
                f"{run.label + cached:<22}{suite:<7}{count['passed']:>8}"
                f"{count['failed']:>8}{count['skipped']:>8}"
            )
            print(f"{line}{diffs[suite] if run is not base else '':>8}{wall:>9}")


def print_guard(run: Run) -> None:
    guard = run.guard
    stats = guard["stats"]
    print(
        f"  guard over {guard['tests']} tests in {guard['workers']} processes: "
        f"internal_errors {stats.get('internal_errors', 0)}, statements "
        f"{stats.get('statements', 0)}, identity_map_hits "
        f"{stats.get('identity_map_hits', 0)}, verified_objects "
        f"{stats.get('verified_objects', 0)}, stale_reads "
        f"{stats.get('stale_reads', 0)}, verification_errors "
        f"{stats.get('verification_errors', 0)}"
    )
    events = ", ".join(f"{k} {v}" for k, v in sorted(guard["events"].items()))
    print(f"  guard log events: {events or 'none'}")
    for kind, tests in sorted(guard["examples"].items()):
        if kind in guard["internal_errors"]:
            continue  # listed with the internal errors
        print(f"    {kind} ({guard['events'].get(kind, 0)}), e.g. in")
        for nodeid in tests:
            print(f"      {nodeid}")
    reinstalls = sum(guard["reinstalls"].values())
    phases = ", ".join(
        f"before {k} {v}" for k, v in sorted(guard["reinstalls"].items())
    )
    print(
        f"  reinstalled after SQLAlchemy's fixtures removed its listeners: "
        f"{reinstalls} times ({phases or '-'}); "
        f"guard.installed still said True {guard['installed_but_missing']} times"
    )
    if guard["missing"]:
        missing = ", ".join(f"{k} {v}" for k, v in sorted(guard["missing"].items()))
        print(f"    listeners found missing: {missing}")
    for error, count in sorted(guard["uninstall_errors"].items()):
        print(f"    uninstall of the stripped guard failed {count}x: {error}")
    print(
        f"  verification SELECTs hidden from SQLAlchemy's SQL assertions: "
        f"{guard['hidden_statements']}"
    )


def report_run(
    base: Run, run: Run, entries: list[Entry]
) -> tuple[list[str], list[str], dict[str, Any]]:
    """Print one guarded run's differences; return unexpected tests and errors."""
    rate = run.rate
    assert rate is not None
    diffs = differing(base, run)
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for nodeid, group in diffs.items():
        groups[group].append(nodeid)
    print(f"\n== sample_rate={rate}: {len(diffs)} tests differ from the baseline")
    print_guard(run)
    unexpected = []
    tests = [e for e in entries if not e.internal_error and e.applies(rate)]
    for group, nodeids in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0])):
        print(f"\n-- {len(nodeids)}  {group}")
        for nodeid in nodeids:
            entry = next((e for e in tests if e.matches(nodeid)), None)
            if entry is None:
                unexpected.append(nodeid)
                print(f"     {nodeid}")
            else:
                entry.matched_rates.add(rate)
                print(f"     {nodeid}   [expected, line {entry.line}: {entry.reason}]")
    unexplained = []
    errors = [e for e in entries if e.internal_error and e.applies(rate)]
    if run.guard["internal_errors"]:
        print("\n-- internal_error events (where: error)")
    for kind, count in sorted(run.guard["internal_errors"].items()):
        entry = next((e for e in errors if e.matches(kind)), None)
        if entry is None:
            unexplained.append(kind)
            print(f"  {count:>6}  {kind}")
        else:
            entry.matched_rates.add(rate)
            print(f"  {count:>6}  {kind}   [expected, line {entry.line}]")
        for nodeid in run.guard["examples"].get(kind, []):
            print(f"            in {nodeid}")
    counted = run.guard["stats"].get("internal_errors", 0)
    if counted and not run.guard["internal_errors"]:
        # Counted but never logged: the logger itself failed, or the event moved.
        unexplained.append("internal_errors counted without an internal_error event")
        print(f"\n-- {counted} internal_errors counted, none logged")
    record = {
        "sample_rate": rate,
        "seconds": round(run.seconds, 1),
        "counts": {s: dict(c) for s, c in counts_by_suite(run.outcomes).items()},
        "differing": len(diffs),
        "groups": dict(groups),
        "unexpected": unexpected,
        "unexplained_internal_errors": unexplained,
        "guard": run.guard,
    }
    return unexpected, unexplained, record


# -- main ---------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        split = argv.index("--")
        argv, passthrough = argv[:split], argv[split + 1 :]
    else:
        passthrough = []
    parser = argparse.ArgumentParser(
        prog="scripts/sqlalchemy-suite",
        description=(
            "Run SQLAlchemy's own test/orm and test/ext (from the sdist of the "
            "installed version) without and with a guard on every session, and "
            "report every test whose outcome differs. Arguments after -- go to pytest."
        ),
    )
    parser.add_argument(
        "--sample-rates",
        default="1.0,0.0",
        help="comma-separated sample rates of the guarded runs (default: 1.0,0.0)",
    )
    parser.add_argument(
        "--suites",
        default="orm,ext",
        help="comma-separated directories under test/, or files in them "
        "(default: orm,ext; e.g. orm/test_merge.py)",
    )
    parser.add_argument("-k", help="pytest -k expression, for quick iteration")
    parser.add_argument(
        "--jobs", "-n", type=int, default=2, help="pytest-xdist workers (default: 2)"
    )
    parser.add_argument(
        "--baseline",
        choices=["full", "subset"],
        default="full",
        help="full: run every test without a guard first (default); subset: after "
        "the guarded runs, run without a guard only the tests that did not pass "
        "under one (minutes faster; blind to tests that pass only under a guard)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="reuse the baseline of a previous run with the same SQLAlchemy "
        "version and selection instead of running it again",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="where the sdist, baselines and logs go "
        "(default: sqlalchemy-suite/ in the virtual environment)",
    )
    parser.add_argument(
        "--expected",
        type=Path,
        default=EXPECTED,
        help=f"the expected-differences file (default: {EXPECTED.relative_to(ROOT)})",
    )
    parser.add_argument("--report", type=Path, help="also write the result as JSON")
    args = parser.parse_args(argv)
    args.pytest_args = passthrough
    try:
        args.rates = [float(rate) for rate in args.sample_rates.split(",") if rate]
    except ValueError:
        parser.error(f"--sample-rates: not a list of numbers: {args.sample_rates!r}")
    if not all(0.0 <= rate <= 1.0 for rate in args.rates):
        parser.error(f"--sample-rates: each rate must be in 0.0-1.0: {args.rates}")
    args.suites = [suite.strip("/") for suite in args.suites.split(",") if suite]
    if not args.suites:
        parser.error("--suites: name at least one directory under test/")
    if args.jobs < 0:
        parser.error("--jobs: must be 0 (no xdist) or more")
    return args


def baseline_key(args: argparse.Namespace, version: str) -> str:
    selection = json.dumps([version, args.suites, args.k, args.pytest_args])
    return hashlib.sha256(selection.encode()).hexdigest()[:12]


def execute(
    args: argparse.Namespace, version: str, cache: Path
) -> tuple[Run, list[Run], float | None]:
    """The baseline (run or kept) and the guarded runs; the download time."""
    sdist, download = ensure_sdist(cache, version)
    if download is not None:
        print(f"sdist downloaded and unpacked in {download:.0f} s: {sdist}")
    else:
        print(f"sdist: {sdist} (cached)")
    work = cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    kept = cache / f"baseline-{version}-{baseline_key(args, version)}.json"
    if args.keep and kept.exists():
        data = json.loads(kept.read_text())
        base = Run("baseline", None, data["outcomes"], data["seconds"], kept)
        base.cached = True
        print(f"baseline: kept from {kept}: {summary(base.outcomes)}")
    elif args.baseline == "full":
        base = run_pytest(args, sdist, work, "baseline", None)
        kept.write_text(
            json.dumps({"outcomes": base.outcomes, "seconds": base.seconds})
        )
    guarded = [
        run_pytest(args, sdist, work, f"guarded-{rate}", rate) for rate in args.rates
    ]
    if not (args.keep and kept.exists()) and args.baseline == "subset":
        base = subset_baseline(args, sdist, work, guarded)
    return base, guarded, download


def subset_baseline(
    args: argparse.Namespace, sdist: Path, work: Path, guarded: list[Run]
) -> Run:
    """
    A baseline of only the tests that did not pass under some guard.

    A test that passed under every guard is taken to pass without one; what
    this cannot see is a test that passes only under a guard.
    """
    passed = {
        nodeid
        for nodeid, entry in guarded[0].outcomes.items()
        if entry["outcome"] == "passed"
    }
    everyone: set[str] = set()
    for run in guarded:
        everyone |= set(run.outcomes)
        passed &= {n for n, e in run.outcomes.items() if e["outcome"] == "passed"}
    rerun = sorted(everyone - passed)
    if rerun:
        base = run_pytest(args, sdist, work, "baseline", None, only=rerun)
    else:
        base = Run("baseline", None, {}, 0.0, work / "baseline.log")
    base.subset = len(rerun)
    inferred = {"outcome": "passed", "inferred": "passed under every guard"}
    for nodeid in passed:
        base.outcomes.setdefault(nodeid, inferred)
    return base


def stale_entries(args: argparse.Namespace, entries: list[Entry]) -> list[Entry]:
    """Entries that matched nothing at a sample rate they hold for."""
    if args.k or args.pytest_args:
        return []  # a narrowed run cannot tell
    suites_run = {suite.split("/")[0] for suite in args.suites} | {"?"}
    stale = []
    for entry in entries:
        if not entry.internal_error and suite_of(entry.pattern) not in suites_run:
            continue
        missed = [
            rate
            for rate in args.rates
            if entry.applies(rate) and rate not in entry.matched_rates
        ]
        if missed:
            stale.append(entry)
            print(
                f"stale entry, line {entry.line} of {args.expected.name} (no "
                f"difference at sample_rate {', '.join(map(str, missed))}): "
                f"{entry.pattern}"
            )
    return stale


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    version = metadata.version("sqlalchemy")
    cache = args.cache_dir or Path(sys.prefix) / "sqlalchemy-suite"
    print(
        f"SQLAlchemy {version} (installed), Python {sys.version.split()[0]}, "
        f"suites {', '.join(args.suites)}, sample rates "
        f"{', '.join(map(str, args.rates))}, {args.jobs} workers",
        flush=True,
    )
    try:
        entries = parse_expected(args.expected)
        base, guarded, download = execute(args, version, cache)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print()
    print_counts(base, guarded)
    failures = []
    records = []
    for run in guarded:
        tests, errors, record = report_run(base, run, entries)
        records.append(record)
        if tests:
            failures.append(
                f"sample_rate={run.rate}: {len(tests)} differing tests are not "
                f"in {args.expected.name}"
            )
        if errors:
            failures.append(
                f"sample_rate={run.rate}: {len(errors)} kinds of internal_error "
                f"are not in {args.expected.name}"
            )
    print()
    stale = stale_entries(args, entries)
    if stale:
        failures.append(f"{len(stale)} stale entries in {args.expected.name}")
    if download is not None:
        print(f"time: sdist download {download:.0f} s")
    note = " (kept)" if base.cached else ""
    if base.subset is not None:
        note = f" ({base.subset} tests)"
    times = [f"baseline {base.seconds:.0f} s{note}"]
    times += [f"guarded {run.rate} {run.seconds:.0f} s" for run in guarded]
    print(f"time: {', '.join(times)}")
    if args.report:
        result = {
            "sqlalchemy": version,
            "sdist_download_seconds": download,
            "baseline": {
                "seconds": round(base.seconds, 1),
                "kept": base.cached,
                "subset": base.subset,
                "counts": {
                    s: dict(c) for s, c in counts_by_suite(base.outcomes).items()
                },
            },
            "runs": records,
            "stale_entries": [dataclasses.asdict(entry) for entry in stale],
            "failures": failures,
        }
        args.report.write_text(json.dumps(result, indent=1, default=sorted))
    for failure in failures:
        print(f"FAIL {failure}")
    if not failures:
        print("OK: no difference from the baseline that is not expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
