"""
Overhead of sessionguard: configurations in their own processes, interleaved.

    python benchmarks/run.py [--rounds 7] [--ops 1000] [--database-url URL ...]
    python benchmarks/run.py --check    # exit status 1 when a target is missed
    python benchmarks/run.py --calls    # Python function calls per operation
    python benchmarks/run.py --opcodes [--check]   # bytecodes, deterministic
    python benchmarks/run.py --instructions [--check]   # callgrind, deterministic

Each configuration (configs.py) runs in a worker process of its own
(worker.py): a guard listens on the Session class and hooks process-wide
functions, so configurations sharing a process would tax each other and
flatter the guard. The workers take turns, round by round: in each round
every configuration times every workload, in an order that rotates from
batch to batch, so that a burst of load on the machine hits them all alike.
Each round starts its workers afresh, at a memory layout of its own
(layout.py): where a process's objects land in memory moves its speed by a
few per cent, and a worker kept for the whole run would keep that bias.
The report gives, per workload and configuration, the median over rounds of
the ratio to the baseline of the same round, with its range, and the
baseline's absolute microseconds per operation.

Beside the timed workloads (workloads.py: W1, W2, W3, and W1/W2 with 10,000
objects held), ``memory`` is the tracemalloc growth over 100,000 statements
in one session, each configuration in a fresh process.

``--calls`` counts Python function calls per operation instead (cProfile's
deterministic count, each configuration in its own process again): the same
from run to run on any machine, for comparing changes to the hot path when
wall-clock times are blurred by other load.

``--opcodes`` counts the bytecodes executed per operation instead
(``sys.settrace`` opcode events in the worker's thread, each configuration
in its own process, with a fixed hash seed): the same from run to run, and,
unlike calls, weighted by what each function does. On these workloads the
ratios of bytecode counts follow the ratios of times within a few hundredths
(docs/performance.md), so ``--check --opcodes`` evaluates the targets on
them when the machine is too noisy to time. It counts Python only: what C
does (SQLite's engine, the drivers) and what a server does are not in it.

``--instructions`` counts the machine instructions per operation instead
(valgrind's callgrind, each configuration in its own process under it, all at
once: the count does not depend on load). Python runs with a fixed hash seed,
so the count is the same from run to run to the instruction; the memory
layout still moves it by a few per cent (layout.py), so each configuration
is counted at ``--layouts`` layouts and the median is reported. It covers what
the process executes (SQLite's engine included), not what a server does, so
it is for in-memory SQLite only. Ratios of instruction counts stand in for
ratios of times on a machine too noisy to time: they miss what instructions
do not show (cache misses, waits), and ``--check --instructions`` evaluates
the targets on them.

``--check`` evaluates the targets of issue 10 (targets.py) and prints them
with what was measured. Exit status: 0 every target measured and met; 1 a
target missed; 3 none missed, but some not measured (the PostgreSQL one
needs ``--database-url postgresql+psycopg://...`` beside ``sqlite``; a
filtered run skips the others).
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from configs import CONFIGURATIONS
from targets import TARGETS, Target
from workloads import WORKLOADS, create_data

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

WORKER = Path(__file__).with_name("worker.py")
LAYOUT = Path(__file__).with_name("layout.py")
IN_MEMORY_SQLITE = "sqlite://"
MEMORY = "memory"

# Which configurations each measurement runs. check-floor differs from the
# baseline only where a guard at 100 % would check an identity-map hit.
APPLIES: dict[str, tuple[str, ...]] = {
    "W1": tuple(name for name in CONFIGURATIONS if name != "check-floor"),
    "W2": tuple(CONFIGURATIONS),
    "W3": tuple(CONFIGURATIONS),
    "W1-10k": ("baseline", "guard-0", "guard-100"),
    "W2-10k": ("baseline", "guard-0", "guard-100"),
    MEMORY: ("baseline", "guard-100"),
}
MEMORY_WARMUP = 2_000
# The C function of operator.call(): the worker's measured region under
# callgrind (worker.py's ``instructions``). Nothing else in the worker calls it.
_REGION_FUNCTION = "_operator_call"


# -- worker processes


class WorkerProcess:
    """One worker.py process: one configuration on one database."""

    def __init__(
        self,
        configuration: str,
        url: str,
        callgrind: Path | None = None,
        layout: int = 0,
        fixed_hash_seed: bool = False,
    ) -> None:
        self.configuration = configuration
        self.callgrind_out = (
            None if callgrind is None else callgrind / f"{configuration}.{layout}"
        )
        prefix: list[str] = []
        env = None
        if self.callgrind_out is not None:
            # Collect only inside operator.call (the worker's measured region),
            # and dump when it returns: one file per region, out.1, out.2, ...
            prefix = _callgrind(self.callgrind_out)
            fixed_hash_seed = True
        if fixed_hash_seed:
            # The same dict and set layouts every run, so the same count.
            env = {**os.environ, "PYTHONHASHSEED": "0"}
        self.process = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                str(LAYOUT),
                str(layout),
                str(WORKER),
                configuration,
                url,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def region_instructions(self, region: int) -> int:
        """The instructions of the worker's callgrind region *region*."""
        assert self.callgrind_out is not None
        dump = Path(f"{self.callgrind_out}.{region}")
        if not dump.exists():
            raise RuntimeError(
                f"callgrind wrote no {dump} for the worker's region "
                f"({_REGION_FUNCTION})"
            )
        for line in dump.read_text().splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1])
        raise RuntimeError(f"no totals line in {dump}")

    def send(self, command: str, **arguments: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"command": command, **arguments}) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            status = self.process.wait()
            raise RuntimeError(
                f"worker {self.configuration!r} exited with status {status}"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def wait_ready(self) -> None:
        self._read()

    def ask(self, command: str, **arguments: Any) -> dict[str, Any]:
        self.send(command, **arguments)
        return self._read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def workers(
    configurations: Sequence[str],
    url: str,
    callgrind: Path | None = None,
    layout: int = 0,
    fixed_hash_seed: bool = False,
) -> Iterator[dict[str, WorkerProcess]]:
    """Workers for *configurations*, started together, all ended on exit."""
    started: dict[str, WorkerProcess] = {}
    try:
        for name in configurations:
            started[name] = WorkerProcess(name, url, callgrind, layout, fixed_hash_seed)
        for process in started.values():
            process.wait_ready()
        yield started
    finally:
        for process in started.values():
            if process.process.poll() is None:
                process.close()


# -- measuring


def _ops(workload: str, ops: int) -> int:
    return max(3, round(ops / WORKLOADS[workload].cost))


def _warmup(ops: int) -> int:
    return max(1, min(50, ops // 10))


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure_times(
    url: str,
    workloads: Sequence[str],
    configurations: Sequence[str],
    *,
    rounds: int,
    ops: int,
    repeat: int,
) -> dict[str, Any]:
    plan = {
        workload: [name for name in configurations if name in APPLIES[workload]]
        for workload in workloads
    }
    needed = [name for name in configurations if any(name in p for p in plan.values())]
    # samples[workload][configuration][round] = the batches of that round
    samples: dict[str, dict[str, list[list[dict[str, Any]]]]] = {
        workload: {name: [[] for _ in range(rounds)] for name in names}
        for workload, names in plan.items()
    }
    started = time.monotonic()
    for round_number in range(rounds):
        # Fresh workers each round, at the round's memory layout (layout.py):
        # a process keeps its layout's luck in CPython's caches for as long as
        # it lives, so workers that lived through the whole run would carry
        # one layout's bias into every round.
        with workers(needed, url, layout=round_number) as pool:
            for workload, names in plan.items():
                count = _ops(workload, ops)
                for batch in range(repeat):
                    shift = (round_number * repeat + batch) % len(names)
                    for name in names[shift:] + names[:shift]:
                        samples[workload][name][round_number].append(
                            pool[name].ask(
                                "time",
                                workload=workload,
                                ops=count,
                                warmup=_warmup(count),
                            )
                        )
        _progress(
            f"  round {round_number + 1}/{rounds} done "
            f"({time.monotonic() - started:.0f} s)"
        )
    results: dict[str, Any] = {}
    for workload, by_name in samples.items():
        # Other load on the machine only ever adds time: the fastest batch of
        # a round is that round's best estimate.
        best = {
            name: [min(batch["us_per_op"] for batch in batches) for batches in runs]
            for name, runs in by_name.items()
        }
        baseline = best["baseline"]
        entry: dict[str, Any] = {
            "description": WORKLOADS[workload].description,
            "ops": _ops(workload, ops),
            "batches_per_round": repeat,
            "configurations": {},
        }
        for name, runs in by_name.items():
            times = best[name]
            batches = [batch for batches in runs for batch in batches]
            ratios = [t / b for t, b in zip(times, baseline, strict=True)]
            guard_per_op: dict[str, float] = {}
            for key in batches[0]["guard_per_op"]:
                guard_per_op[key] = statistics.fmean(
                    batch["guard_per_op"][key] for batch in batches
                )
            entry["configurations"][name] = {
                "batches_us_per_op": [
                    [batch["us_per_op"] for batch in round_batches]
                    for round_batches in runs
                ],
                "us_per_op": times,
                "ratios": ratios,
                "median_us_per_op": statistics.median(times),
                "median_ratio": statistics.median(ratios),
                "median_extra_us": statistics.median(
                    t - b for t, b in zip(times, baseline, strict=True)
                ),
                "min_ratio": min(ratios),
                "max_ratio": max(ratios),
                "guard_per_op": guard_per_op,
            }
        results[workload] = entry
    return results


def measure_memory(
    url: str, configurations: Sequence[str], statements: int
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in configurations:
        if name not in APPLIES[MEMORY]:
            continue
        _progress(f"  memory: {name}, {statements} statements")
        # A fresh process each: growth is measured from a known state.
        with workers([name], url) as pool:
            results[name] = pool[name].ask(
                "memory", statements=statements, warmup=MEMORY_WARMUP
            )
    return results


def measure_calls(
    url: str, workloads: Sequence[str], configurations: Sequence[str], ops: int
) -> dict[str, Any]:
    results: dict[str, Any] = {workload: {} for workload in workloads}
    for name in configurations:
        _progress(f"  calls: {name}")
        with workers([name], url) as pool:
            for workload in workloads:
                if name in APPLIES[workload]:
                    count = _ops(workload, ops)
                    results[workload][name] = pool[name].ask(
                        "calls", workload=workload, ops=count, warmup=_warmup(count)
                    )
    return results


def measure_opcodes(
    url: str, workloads: Sequence[str], configurations: Sequence[str], ops: int
) -> dict[str, Any]:
    """Bytecodes per operation, every configuration in its own process at once."""
    needed = [
        name
        for name in configurations
        if any(name in APPLIES[workload] for workload in workloads)
    ]
    results: dict[str, Any] = {}
    started = time.monotonic()
    with workers(needed, url, fixed_hash_seed=True) as pool:
        for workload in workloads:
            names = [name for name in needed if name in APPLIES[workload]]
            count = _ops(workload, ops)
            # All at once: the counts do not depend on what else runs.
            for name in names:
                pool[name].send(
                    "opcodes", workload=workload, ops=count, warmup=_warmup(count)
                )
            answers = {name: pool[name].receive() for name in names}
            base = answers["baseline"]["opcodes_per_op"]
            results[workload] = {
                "description": WORKLOADS[workload].description,
                "ops": count,
                "configurations": {
                    name: {**answer, "ratio": answer["opcodes_per_op"] / base}
                    for name, answer in answers.items()
                },
            }
            _progress(
                f"  opcodes: {workload} done ({time.monotonic() - started:.0f} s)"
            )
    return results


def _callgrind(out: Path) -> list[str]:
    """valgrind's command line: count only inside the region, one dump each."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--quiet",
        "--collect-atstart=no",
        f"--toggle-collect={_REGION_FUNCTION}",
        f"--dump-after={_REGION_FUNCTION}",
        f"--callgrind-out-file={out}",
    ]


def _check_region_symbol() -> None:
    """Fail early, and say why, when callgrind cannot see the region function."""
    with tempfile.TemporaryDirectory(prefix="sg-callgrind-probe-") as directory:
        out = Path(directory) / "probe"
        subprocess.run(
            [
                *_callgrind(out),
                sys.executable,
                "-c",
                "import operator; operator.call(int)",
            ],
            check=True,
            capture_output=True,
        )
        if not Path(f"{out}.1").exists():
            raise SystemExit(
                f"--instructions: callgrind does not see {_REGION_FUNCTION} in "
                f"{os.path.realpath(sys.executable)}: a stripped build (Debian's "
                "own python3 is one). Run it with a Python that keeps its "
                "symbols, e.g. pyenv's or python.org's build."
            )


def measure_instructions(
    url: str,
    workloads: Sequence[str],
    configurations: Sequence[str],
    ops: int,
    layouts: int,
) -> dict[str, Any]:
    """
    Instructions per operation, every configuration under callgrind at once,
    at *layouts* memory layouts one after the other (layout.py): the median
    over layouts is what a configuration costs, not what one layout's luck in
    CPython's caches makes of it.
    """
    if shutil.which("valgrind") is None:
        raise SystemExit(
            "--instructions needs valgrind (callgrind): apt-get install valgrind"
        )
    _check_region_symbol()
    needed = [
        name
        for name in configurations
        if any(name in APPLIES[workload] for workload in workloads)
    ]
    # counts[workload][configuration] = instructions per operation, per layout
    counts: dict[str, dict[str, list[float]]] = {
        workload: {name: [] for name in needed if name in APPLIES[workload]}
        for workload in workloads
    }
    started = time.monotonic()
    for layout in range(layouts):
        with (
            tempfile.TemporaryDirectory(prefix="sg-callgrind-") as directory,
            workers(needed, url, Path(directory), layout) as pool,
        ):
            for workload, by_name in counts.items():
                count = _ops(workload, ops)
                # All at once: the counts do not depend on what else runs.
                for name in by_name:
                    pool[name].send(
                        "instructions",
                        workload=workload,
                        ops=count,
                        warmup=_warmup(count),
                    )
                for name, per_layout in by_name.items():
                    answer = pool[name].receive()
                    total = pool[name].region_instructions(answer["region"])
                    per_layout.append(total / count)
                _progress(
                    f"  layout {layout + 1}/{layouts}: {workload} done "
                    f"({time.monotonic() - started:.0f} s)"
                )
    results: dict[str, Any] = {}
    for workload, by_name in counts.items():
        base = statistics.median(by_name["baseline"])
        results[workload] = {
            "description": WORKLOADS[workload].description,
            "ops": _ops(workload, ops),
            "layouts": layouts,
            "configurations": {
                name: {
                    "instructions_per_op_by_layout": per_layout,
                    "instructions_per_op": statistics.median(per_layout),
                    "ratio": statistics.median(per_layout) / base,
                    "min_ratio": min(per_layout) / base,
                    "max_ratio": max(per_layout) / base,
                }
                for name, per_layout in by_name.items()
            },
        }
    return results


# -- reading results


class DatabaseResults:
    """The measurements of one database, as targets.py reads them."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    @property
    def dialect(self) -> str:
        dialect: str = self.data["dialect"]
        return dialect

    def ratio(self, workload: str, configuration: str) -> float | None:
        counted = self.data.get("instructions") or self.data.get("opcodes")
        if counted is not None:
            entry = counted.get(workload)
            if entry is None or configuration not in entry["configurations"]:
                return None
            share: float = entry["configurations"][configuration]["ratio"]
            return share
        entry = self.data.get("times", {}).get(workload)
        if entry is None or configuration not in entry["configurations"]:
            return None
        ratio: float = entry["configurations"][configuration]["median_ratio"]
        return ratio

    def memory_growth(self, configuration: str, statements: int) -> float | None:
        entry = self.data.get("memory", {}).get(configuration)
        if entry is None or entry["statements"] < statements:
            return None
        growth: float = entry["growth_bytes"]
        return growth


def evaluate(databases: Sequence[DatabaseResults]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for target in TARGETS:
        applicable = [db for db in databases if target.dialect in (None, db.dialect)]
        if not applicable:
            rows.append(_row(target, target.dialect or "any", None, None))
        for db in applicable:
            floor = target.floor(db) if target.floor is not None else None
            rows.append(
                _row(
                    target,
                    db.data["label"],
                    target.measured(db),
                    target.limit(db),
                    floor,
                )
            )
    return rows


def _row(
    target: Target,
    database: str,
    measured: float | None,
    limit: float | None,
    floor: float | None = None,
) -> dict[str, Any]:
    return {
        "target": target.text,
        "database": database,
        "unit": target.unit,
        "measured": measured,
        "limit": limit,
        "floor": floor,
        "floor_above_limit": (
            floor is not None and limit is not None and floor > limit
        ),
        "verdict": target.verdict(measured, limit),
    }


# -- printing


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)
    ]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
            + " |"
        )

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "bytes":
        return f"{value / 1000:,.0f} kB"
    return f"{value:.3f}" if unit != "ratio" else f"{value:.2f}"


def print_times(data: dict[str, Any], configurations: Sequence[str]) -> None:
    times: dict[str, Any] = data["times"]
    workloads = [w for w in times if not w.endswith("-10k")]
    if workloads:
        header = ["configuration", *(f"{w} ({times[w]['ops']} ops)" for w in workloads)]
        rows = []
        for name in configurations:
            cells = [name]
            for workload in workloads:
                entry = times[workload]["configurations"].get(name)
                if entry is None:
                    cells.append("—")
                elif name == "baseline":
                    cells.append(f"1.00 ({entry['median_us_per_op']:.0f} µs)")
                else:
                    cells.append(
                        f"{entry['median_ratio']:.2f} "
                        f"({entry['min_ratio']:.2f}-{entry['max_ratio']:.2f})"
                    )
            rows.append(cells)
        print(_table(header, rows))
        print()
        print("What the guard did per operation:")
        print("(statements / identity-map hits / objects verified)")
        guard_rows = []
        for name in configurations:
            cells = [name]
            for workload in workloads:
                entry = times[workload]["configurations"].get(name)
                per_op = entry["guard_per_op"] if entry else {}
                cells.append(
                    " / ".join(
                        f"{per_op[k]:.2f}"
                        for k in ("statements", "identity_map_hits", "verified_objects")
                    )
                    if per_op
                    else "—"
                )
            if any(cell != "—" for cell in cells[1:]):
                guard_rows.append(cells)
        print(_table(["configuration", *workloads], guard_rows))
        print()
    if any(w.endswith("-10k") for w in times):
        print_size(times)


def print_size(times: dict[str, Any]) -> None:
    """Ratios (and added µs) with 10 and with 10,000 objects held, and drift."""
    print("Identity-map size: 10 vs 10,000 objects held (ratio, added µs/op):")
    large = [w for w in times if w.endswith("-10k")]
    header = ["configuration"]
    for workload in large:
        header += [f"{workload.removesuffix('-10k')} (10 held)", workload, "drift"]
    rows = []
    for name in APPLIES["W1-10k"]:
        cells = [name]
        for workload in large:
            pair = [
                times.get(w, {}).get("configurations", {}).get(name)
                for w in (workload.removesuffix("-10k"), workload)
            ]
            if name == "baseline":
                cells += [_us(entry) for entry in pair] + [""]
                continue
            cells += [
                f"{entry['median_ratio']:.2f} ({entry['median_extra_us']:+.0f} µs)"
                if entry
                else "—"
                for entry in pair
            ]
            small, big = pair
            cells.append(
                f"{big['median_ratio'] / small['median_ratio'] - 1:+.1%}"
                if small and big
                else "—"
            )
        rows.append(cells)
    print(_table(header, rows))
    print()


def _us(entry: dict[str, Any] | None) -> str:
    return f"{entry['median_us_per_op']:.0f} µs" if entry else "—"


def print_memory(data: dict[str, Any]) -> None:
    memory: dict[str, Any] = data.get("memory", {})
    if not memory:
        return
    print("Memory (tracemalloc growth, one session, objects not held):")
    rows = [
        [
            name,
            f"{entry['statements']:,}",
            f"{entry['guard_statements']:,}",
            f"{entry['growth_bytes'] / 1000:,.1f} kB",
            entry["top_growth"][0]["where"] if entry["top_growth"] else "",
        ]
        for name, entry in memory.items()
    ]
    print(
        _table(
            ["configuration", "statements", "guarded", "growth", "largest growth at"],
            rows,
        )
    )
    print()


def print_calls(data: dict[str, Any], configurations: Sequence[str]) -> None:
    calls: dict[str, Any] = data["calls"]
    header = ["configuration", *calls]
    rows = []
    for name in configurations:
        cells = [name]
        for entry in calls.values():
            this, base = entry.get(name), entry.get("baseline")
            if this is None:
                cells.append("—")
            elif base is None or name == "baseline":
                cells.append(f"{this['calls_per_op']:.0f}")
            else:
                cells.append(
                    f"{this['calls_per_op']:.0f} "
                    f"({this['calls_per_op'] - base['calls_per_op']:+.0f})"
                )
        rows.append(cells)
    print("Python function calls per operation (difference to baseline):")
    print(_table(header, rows))
    print()
    for workload, entry in calls.items():
        groups = list(next(iter(entry.values()))["by_package"]) if entry else []
        rows = [
            [
                name,
                *(f"{entry[name]['by_package'][g]:.0f}" for g in groups),
                f"{entry[name]['calls_per_op']:.0f}",
            ]
            for name in configurations
            if name in entry
        ]
        print(f"{workload}: calls per operation by where the function lives:")
        print(_table(["configuration", *groups, "total"], rows))
        print()


def _count_rows(
    counted: dict[str, Any],
    configurations: Sequence[str],
    cell: Callable[[str, dict[str, Any], dict[str, Any]], str],
) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a table of counts: *cell*(name, this, entry)."""
    header = ["configuration", *(f"{w} ({counted[w]['ops']} ops)" for w in counted)]
    rows = []
    for name in configurations:
        cells = [name]
        for entry in counted.values():
            this = entry["configurations"].get(name)
            cells.append("—" if this is None else cell(name, this, entry))
        rows.append(cells)
    return header, rows


def _instructions_cell(name: str, this: dict[str, Any], entry: dict[str, Any]) -> str:
    if name == "baseline":
        return f"1.000 ({this['instructions_per_op'] / 1000:,.0f} k)"
    if len(this["instructions_per_op_by_layout"]) > 1:
        return f"{this['ratio']:.3f} ({this['min_ratio']:.3f}-{this['max_ratio']:.3f})"
    return f"{this['ratio']:.3f}"


def print_instructions(data: dict[str, Any], configurations: Sequence[str]) -> None:
    counted: dict[str, Any] = data["instructions"]
    header, rows = _count_rows(counted, configurations, _instructions_cell)
    layouts = max(entry["layouts"] for entry in counted.values())
    print(
        "Instructions per operation (callgrind): the median over "
        f"{layouts} memory layout{'s' if layouts > 1 else ''}, as a ratio to "
        "the baseline's median"
        + (" (the layouts' min-max)" if layouts > 1 else "")
        + "; baseline in thousands of instructions:"
    )
    print(_table(header, rows))
    print()
    large = [
        w for w in counted if w.endswith("-10k") and w.removesuffix("-10k") in counted
    ]
    if large:
        print("Identity-map size: ratio with 10 vs 10,000 objects held, and drift:")
        rows = []
        for name in APPLIES["W1-10k"]:
            if name == "baseline":
                continue
            cells = [name]
            for workload in large:
                small = counted[workload.removesuffix("-10k")]["configurations"].get(
                    name
                )
                big = counted[workload]["configurations"].get(name)
                cells += [
                    f"{small['ratio']:.3f}" if small else "—",
                    f"{big['ratio']:.3f}" if big else "—",
                    f"{big['ratio'] / small['ratio'] - 1:+.1%}"
                    if small and big
                    else "—",
                ]
            rows.append(cells)
        header = ["configuration"]
        for workload in large:
            header += [workload.removesuffix("-10k"), workload, "drift"]
        print(_table(header, rows))
        print()


def _opcodes_cell(name: str, this: dict[str, Any], entry: dict[str, Any]) -> str:
    if name == "baseline":
        return f"1.000 ({this['opcodes_per_op']:,.0f})"
    added = (
        this["opcodes_per_op"] - entry["configurations"]["baseline"]["opcodes_per_op"]
    )
    return f"{this['ratio']:.3f} ({added:+,.0f})"


def print_opcodes(data: dict[str, Any], configurations: Sequence[str]) -> None:
    counted: dict[str, Any] = data["opcodes"]
    header, rows = _count_rows(counted, configurations, _opcodes_cell)
    print(
        "Bytecodes executed per operation (sys.settrace opcode events), as a "
        "ratio to the baseline (added bytecodes); baseline in bytecodes:"
    )
    print(_table(header, rows))
    print()
    for workload, entry in counted.items():
        groups = sorted(
            {g for this in entry["configurations"].values() for g in this["by_package"]}
        )
        rows = [
            [
                name,
                *(f"{this['by_package'].get(g, 0.0):,.0f}" for g in groups),
                f"{this['opcodes_per_op']:,.0f}",
            ]
            for name, this in entry["configurations"].items()
        ]
        print(f"{workload}: bytecodes per operation by where the code lives:")
        print(_table(["configuration", *groups, "total"], rows))
        print()


def print_call_differences(data: dict[str, Any], workload: str, top: int) -> None:
    """The functions each configuration calls most more often than the baseline."""
    entry = data["calls"].get(workload, {})
    base = entry.get("baseline")
    if base is None:
        return
    for name, this in entry.items():
        if name == "baseline":
            continue
        added = sorted(
            (
                (calls - base["functions"].get(where, 0.0), where)
                for where, calls in this["functions"].items()
            ),
            reverse=True,
        )[:top]
        print(f"{workload}, {name}: most added calls per operation")
        print(_table(["calls", "function"], [[f"{c:+.1f}", w] for c, w in added]))
        print()


def print_targets(rows: Sequence[dict[str, Any]]) -> None:
    print("Targets (issue 10):")
    print(
        _table(
            ["target", "database", "measured", "limit", "floor", "result"],
            [
                [
                    row["target"],
                    row["database"],
                    _number(row["measured"], row["unit"]),
                    _number(row["limit"], row["unit"]),
                    _number(row.get("floor"), row["unit"])
                    + (" (> limit)" if row.get("floor_above_limit") else ""),
                    row["verdict"],
                ]
                for row in rows
            ],
        )
    )
    print(
        "floor: what does only the target configuration's unavoidable part "
        "(floor, check-floor, telemetry-floor) in the same run; "
        "(> limit): no guard can meet that limit in this run."
    )


# -- command line


def _names(value: str, valid: Sequence[str], what: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown)}; valid: {', '.join(valid)}"
        )
    return names


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= 1")
    return number


def _label(url: str) -> str:
    if url == IN_MEMORY_SQLITE:
        return "sqlite (in memory)"
    parsed = make_url(url)
    return f"{parsed.get_backend_name()} ({parsed.host or parsed.database or 'local'})"


def _environment() -> dict[str, Any]:
    import sessionguard

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlalchemy": sqlalchemy.__version__,
        "sessionguard": sessionguard.__version__,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0] if __doc__ else None
    )
    all_workloads = [*WORKLOADS, MEMORY]
    parser.add_argument(
        "--database-url",
        action="append",
        metavar="URL",
        help="a database to measure on, repeatable; 'sqlite' (the default) is "
        "in-memory SQLite with a StaticPool. On any other database the table "
        "sessionguard_bench_items is dropped and recreated.",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed batches per configuration and workload in each round, "
        "interleaved too; the round keeps the fastest",
    )
    parser.add_argument(
        "--ops",
        type=int,
        default=400,
        help="operations per timed batch of W1; other workloads divide it by "
        "their cost ("
        + ", ".join(f"{w.name}: {w.cost:g}" for w in WORKLOADS.values() if w.cost != 1)
        + ")",
    )
    parser.add_argument(
        "--workloads",
        type=lambda v: _names(v, all_workloads, "workload"),
        default=all_workloads,
        help=f"comma list of {', '.join(all_workloads)} (default: all)",
    )
    parser.add_argument(
        "--configs",
        type=lambda v: _names(v, list(CONFIGURATIONS), "configuration"),
        default=list(CONFIGURATIONS),
        help=f"comma list of {', '.join(CONFIGURATIONS)} (default: all; "
        "baseline always runs)",
    )
    parser.add_argument(
        "--memory-statements",
        type=int,
        default=100_000,
        help="statements of the memory measurement (the target needs 100,000)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--calls", action="store_true", help="count Python calls per operation"
    )
    mode.add_argument(
        "--check", action="store_true", help="evaluate the targets (exit status)"
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per operation with valgrind's callgrind instead "
        "of timing (in-memory SQLite only; with --check, the targets are "
        "evaluated on instruction ratios)",
    )
    parser.add_argument(
        "--opcodes",
        action="store_true",
        help="count the bytecodes executed per operation instead of timing "
        "(deterministic; with --check, the targets are evaluated on their "
        "ratios)",
    )
    parser.add_argument(
        "--layouts",
        type=_positive,
        default=3,
        help="with --instructions, the memory layouts each configuration is "
        "counted at (layout.py); the report gives the median (default: 3)",
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="write every number to PATH"
    )
    return parser


def measure(args: argparse.Namespace, configurations: list[str]) -> dict[str, Any]:
    timed = [w for w in args.workloads if w != MEMORY]
    report: dict[str, Any] = {
        "environment": _environment(),
        "arguments": {
            "rounds": args.rounds,
            "repeat": args.repeat,
            "ops": args.ops,
            "workloads": args.workloads,
            "configurations": configurations,
            "memory_statements": args.memory_statements,
            "layouts": args.layouts,
            "mode": "calls"
            if args.calls
            else ("check" if args.check else "times")
            + (" (instructions)" if args.instructions else "")
            + (" (opcodes)" if args.opcodes else ""),
        },
        "databases": [],
    }
    for given in args.database_url or ["sqlite"]:
        url = IN_MEMORY_SQLITE if given == "sqlite" else given
        engine = create_engine(url)
        data: dict[str, Any] = {
            "label": _label(url),
            "url": make_url(url).render_as_string(hide_password=True),
            "dialect": engine.dialect.name,
        }
        if url != IN_MEMORY_SQLITE:
            create_data(engine)  # in-memory SQLite: each worker makes its own
        engine.dispose()
        _progress(f"{data['label']}:")
        if args.calls:
            data["calls"] = measure_calls(url, timed, configurations, args.ops)
        else:
            if timed and args.instructions:
                data["instructions"] = measure_instructions(
                    url, timed, configurations, args.ops, args.layouts
                )
            elif timed and args.opcodes:
                data["opcodes"] = measure_opcodes(url, timed, configurations, args.ops)
            elif timed:
                data["times"] = measure_times(
                    url,
                    timed,
                    configurations,
                    rounds=args.rounds,
                    ops=args.ops,
                    repeat=args.repeat,
                )
            if MEMORY in args.workloads:
                data["memory"] = measure_memory(
                    url, configurations, args.memory_statements
                )
        report["databases"].append(data)
    report["environment"]["load_average_after"] = os.getloadavg()
    return report


def print_report(
    report: dict[str, Any], args: argparse.Namespace, configurations: list[str]
) -> None:
    env = report["environment"]
    print(
        f"sessionguard {env['sessionguard']}, SQLAlchemy {env['sqlalchemy']}, "
        f"Python {env['python']}, {env['cpus']} CPUs, load average "
        f"{env['load_average'][0]:.1f} before, "
        f"{env['load_average_after'][0]:.1f} after"
    )
    for data in report["databases"]:
        print()
        if args.calls:
            print(f"## {data['label']}: {args.ops} W1 operations per configuration\n")
            print_calls(data, configurations)
            if "W1" in data["calls"]:
                print_call_differences(data, "W1", top=8)
            continue
        if "opcodes" in data:
            print(f"## {data['label']}: bytecodes executed\n")
            print_opcodes(data, configurations)
            print_memory(data)
            continue
        if "instructions" in data:
            print(f"## {data['label']}: instructions (callgrind)\n")
            print_instructions(data, configurations)
            print_memory(data)
            continue
        print(
            f"## {data['label']}: {args.rounds} rounds of {args.repeat} batches "
            "(the fastest kept); median over rounds of the ratio to the same "
            "round's baseline (min-max), baseline in µs/op\n"
        )
        if "times" in data:
            print_times(data, configurations)
        print_memory(data)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.opcodes and (args.calls or args.instructions):
        parser.error("--opcodes, --instructions and --calls count: pick one")
    if args.instructions:
        if not hasattr(operator, "call"):
            parser.error("--instructions needs Python 3.11+ (operator.call)")
        if args.calls:
            parser.error(
                "--instructions and --calls are two ways of counting: pick one"
            )
        others = [url for url in args.database_url or [] if url != "sqlite"]
        if others:
            parser.error(
                f"--instructions counts this process's instructions, not a "
                f"server's: in-memory SQLite only (got {', '.join(others)})"
            )
    configurations = [
        name for name in CONFIGURATIONS if name == "baseline" or name in args.configs
    ]
    report = measure(args, configurations)
    print_report(report, args, configurations)
    status = 0
    if args.check:
        rows = evaluate([DatabaseResults(data) for data in report["databases"]])
        report["targets"] = rows
        print_targets(rows)
        verdicts = [row["verdict"] for row in rows]
        missed = verdicts.count("FAIL")
        unmeasured = verdicts.count("not measured")
        out_of_reach = sum(
            1 for row in rows if row["verdict"] == "FAIL" and row["floor_above_limit"]
        )
        print(
            f"\n{len(rows) - missed - unmeasured} met, {missed} missed "
            f"({out_of_reach} of them with the floor itself above the limit), "
            f"{unmeasured} not measured"
        )
        status = 1 if missed else 3 if unmeasured else 0
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
