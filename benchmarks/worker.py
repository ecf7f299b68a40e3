"""
A benchmark worker: one configuration on one database, in a process of its own.

    python benchmarks/worker.py CONFIGURATION DATABASE_URL

run.py starts it and talks to it in JSON lines: the worker answers
``{"ready": ...}`` once the configuration is installed, then one line per
command read from stdin (``time``, ``calls``, ``opcodes``, ``instructions``,
``memory``)
until stdin closes.
A guard listens on the Session class and hooks process-wide functions, so
configurations sharing a process would tax each other: hence one per process.
"""

from __future__ import annotations

import cProfile
import dataclasses
import gc
import json
import operator
import pstats
import random
import re
import sys
import sysconfig
import time
import tracemalloc
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from configs import CONFIGURATIONS, Installed, configure_logging
from workloads import ROWS, WORKLOADS, Item, create_data

IN_MEMORY_SQLITE = "sqlite://"

# Where a profiled call's function lives, by path fragment; first match wins.
_CALL_GROUPS = (
    ("sessionguard", "/sessionguard/"),
    ("structlog", "/structlog/"),
    ("opentelemetry", "/opentelemetry/"),
    ("sqlalchemy", "/sqlalchemy/"),
)
_STDLIB = sysconfig.get_paths()["stdlib"]
_REPOSITORY = f"{Path(__file__).resolve().parent.parent}/"


def _call_group(filename: str) -> str:
    for name, part in _CALL_GROUPS:
        if part in filename:
            return name
    if filename == "~":  # how cProfile names C functions
        return "builtins"
    if filename.startswith(_STDLIB) and "site-packages" not in filename:
        return "stdlib"
    return "other"


def _short(filename: str) -> str:
    """A path from the package (or stdlib) root: sqlalchemy/orm/session.py."""
    for root in ("site-packages/", _REPOSITORY, _STDLIB + "/"):
        if root in filename:
            return filename.split(root, 1)[1]
    return filename


class Worker:
    def __init__(self, configuration: str, url: str) -> None:
        configure_logging()
        if url == IN_MEMORY_SQLITE:
            # One connection for the whole process, or every checkout would be
            # a new, empty database.
            self.engine: Engine = create_engine(url, poolclass=StaticPool)
            create_data(self.engine)
        else:
            self.engine = create_engine(url)  # run.py made the data
        self.installed: Installed = CONFIGURATIONS[configuration].install(self.engine)
        # Seed the guard's samplers where there are ones that can be seeded,
        # so that the counts see the same sampled statements in every run.
        # (Best effort: private attributes of today's guard.)
        stale = sys.modules.get("sessionguard._stale")
        for sampler in (
            getattr(self.installed.guard, "_random", None),
            getattr(getattr(stale, "_hooks", None), "random", None),
        ):
            if isinstance(sampler, random.Random):
                sampler.seed(20240610)
        self.regions = 0
        """Callgrind regions run so far (``instructions``)."""

    def _stats(self) -> dict[str, int]:
        guard = self.installed.guard
        return dataclasses.asdict(guard.stats()) if guard is not None else {}

    def time(self, workload: str, ops: int, warmup: int) -> dict[str, Any]:
        """Microseconds per operation of *ops* operations, after *warmup*."""
        running = WORKLOADS[workload](self.engine, self.installed.check)
        running.start()
        try:
            running.run(warmup)
            before = self._stats()
            # The garbage collector stays on: collections the guard's
            # allocations cause are part of its cost. Start from a clean slate.
            gc.collect()
            started = time.perf_counter()
            running.run(ops)
            elapsed = time.perf_counter() - started
            after = self._stats()
        finally:
            running.stop()
            self.installed.after_batch()
        guard_per_op = {
            name: (after[name] - before[name]) / ops
            for name in ("statements", "identity_map_hits", "verified_objects")
            if name in after
        }
        return {"us_per_op": elapsed / ops * 1e6, "guard_per_op": guard_per_op}

    def calls(self, workload: str, ops: int, warmup: int) -> dict[str, Any]:
        """Python function calls per operation (cProfile's deterministic count)."""
        running = WORKLOADS[workload](self.engine, self.installed.check)
        running.start()
        try:
            running.run(warmup)
            gc.collect()
            gc.disable()  # a collection's finalizers would blur the count
            profile = cProfile.Profile()
            try:
                profile.enable()
                running.run(ops)
                profile.disable()
            finally:
                gc.enable()
        finally:
            running.stop()
            self.installed.after_batch()
        stats: dict[tuple[str, int, str], tuple[Any, ...]]
        stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
        groups = dict.fromkeys(
            [*(name for name, _ in _CALL_GROUPS), "builtins", "stdlib", "other"], 0.0
        )
        functions: dict[str, float] = {}
        total = 0
        for (filename, line, function), (_, calls, *_rest) in stats.items():
            total += calls
            groups[_call_group(filename)] += calls / ops
            # C functions' names carry an address that changes from run to run.
            where = re.sub(
                r" at 0x[0-9a-f]+", "", f"{_short(filename)}:{line}({function})"
            )
            functions[where] = functions.get(where, 0.0) + calls / ops
        return {
            "calls_per_op": total / ops,
            "by_package": groups,
            # Everything called at least once per ten operations, for diffing.
            "functions": {
                where: calls
                for where, calls in sorted(functions.items(), key=lambda i: -i[1])
                if calls >= 0.1
            },
        }

    def opcodes(self, workload: str, ops: int, warmup: int) -> dict[str, Any]:
        """
        Bytecode instructions executed per operation (``sys.settrace`` opcode
        events, this thread only), in total and by where the code lives.

        Deterministic, like ``calls``, but it weighs what a function does,
        not only that it was called: on this workload the ratios of opcode
        counts follow the ratios of times closely (docs/performance.md).
        """
        running = WORKLOADS[workload](self.engine, self.installed.check)
        running.start()
        counts: dict[str, int] = {}
        by_code: dict[Any, str] = {}

        def trace(frame: Any, event: str, arg: Any) -> Any:
            code = frame.f_code
            group = by_code.get(code)
            if group is None:
                group = by_code[code] = _call_group(code.co_filename)
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False

            def local(frame: Any, event: str, arg: Any) -> Any:
                if event == "opcode":
                    counts[group] = counts.get(group, 0) + 1
                return local

            return local

        try:
            running.run(warmup)
            gc.collect()
            gc.disable()  # a collection's finalizers would blur the count
            try:
                sys.settrace(trace)
                running.run(ops)
            finally:
                sys.settrace(None)
                gc.enable()
        finally:
            running.stop()
            self.installed.after_batch()
        total = sum(counts.values())
        return {
            "opcodes_per_op": total / ops,
            "by_package": {group: count / ops for group, count in counts.items()},
        }

    def instructions(self, workload: str, ops: int, warmup: int) -> dict[str, Any]:
        """
        Run *ops* operations as one callgrind region (run.py --instructions).

        The worker runs under ``valgrind --tool=callgrind`` with collection
        toggled on, and a dump written, around ``operator.call``: the timed
        operations are its only use here, so each call is one dump file
        holding exactly their instructions. run.py reads the count from it.
        """
        running = WORKLOADS[workload](self.engine, self.installed.check)
        running.start()
        try:
            running.run(warmup)
            region = getattr(operator, "call", None)  # Python 3.11+
            if region is None:
                raise RuntimeError("--instructions needs operator.call: Python 3.11+")
            gc.collect()
            region(running.run, ops)
        finally:
            running.stop()
            self.installed.after_batch()
        self.regions += 1
        return {"region": self.regions, "ops": ops}

    def memory(self, statements: int, warmup: int) -> dict[str, Any]:
        """
        tracemalloc growth over *statements* ORM statements in one session,
        objects not held (each read loads a new object), a commit every 100.
        """

        def run(count: int, offset: int) -> None:
            for i in range(count):
                key = 1 + (offset + i) % ROWS
                session.scalars(select(Item).where(Item.id == key)).one()
                if i % 100 == 99:
                    session.commit()
            session.commit()

        with Session(self.engine) as session:
            tracemalloc.start()
            try:
                run(warmup, 0)
                # The snapshot first: it is itself traced memory, counted
                # on both sides.
                snapshot = tracemalloc.take_snapshot()
                gc.collect()
                before = tracemalloc.get_traced_memory()[0]
                before_stats = self._stats()
                run(statements, warmup)
                gc.collect()
                after = tracemalloc.get_traced_memory()[0]
                after_stats = self._stats()
                growth = tracemalloc.take_snapshot().compare_to(snapshot, "lineno")
            finally:
                tracemalloc.stop()
        return {
            "statements": statements,
            "growth_bytes": after - before,
            "guard_statements": after_stats.get("statements", 0)
            - before_stats.get("statements", 0),
            "top_growth": [
                {
                    "size_diff": stat.size_diff,
                    "where": f"{_short(stat.traceback[0].filename)}:"
                    f"{stat.traceback[0].lineno}",
                }
                for stat in growth[:10]
            ],
        }


def main(argv: list[str]) -> int:
    configuration, url = argv
    # stdout is the channel to run.py: anything else printed goes to stderr.
    channel: TextIO = sys.stdout
    sys.stdout = sys.stderr

    def reply(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    worker = Worker(configuration, url)
    reply({"ready": configuration})
    for line in sys.stdin:
        command = json.loads(line)
        kind = command.pop("command")
        if kind == "time":
            reply(worker.time(**command))
        elif kind == "calls":
            reply(worker.calls(**command))
        elif kind == "instructions":
            reply(worker.instructions(**command))
        elif kind == "opcodes":
            reply(worker.opcodes(**command))
        elif kind == "memory":
            reply(worker.memory(**command))
        else:
            raise ValueError(f"unknown command {kind!r}")
    worker.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
