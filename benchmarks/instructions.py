"""
Instruction counts per operation (valgrind's callgrind), for figures that a
busy machine cannot blur: counts are the same from run to run.

    python benchmarks/instructions.py [--operations 500]

For each workload and configuration the process is run twice under
callgrind, with 0 and with N operations; the difference divided by N is the
cost of one operation in instructions. Baseline and guarded configurations
are measured in the same invocation. Needs valgrind (Debian: valgrind).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = ["baseline (no guard)", "guard, detection off", "guard, sample_rate=0.0",
           "guard, sample_rate=1.0"]  # fmt: skip
WORKLOADS = ["select, 1 hit", "select, 100 hits", "get(), map hit"]


def _child(workload: str, config: str, operations: int, url: str) -> None:
    """Runs inside callgrind: set up, then *operations* operations."""
    sys.path.insert(0, str(HERE))
    import structlog
    from run import CONFIGS as CONFIG_OPTIONS
    from run import WORKLOADS as WORKLOAD_FUNCTIONS
    from run import Item, _setup
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from sessionguard import install_guard

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30),
        cache_logger_on_first_use=True,
    )
    engine = _setup(url)
    options = CONFIG_OPTIONS[config]
    if options is not None:
        install_guard(engine, **options)
    function, _ = WORKLOAD_FUNCTIONS[workload]
    with Session(engine, expire_on_commit=False) as session:
        held = session.scalars(select(Item)).all()
        function(session, 20)  # warm-up, counted in both runs alike
        function(session, operations)
        del held


def _instructions(workload: str, config: str, operations: int, url: str) -> int:
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "callgrind.out"
        subprocess.run(
            [
                "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                sys.executable, __file__, "--child",
                json.dumps([workload, config, operations, url]),
            ],
            check=True, capture_output=True,
            # The same hash seed in every run: set and dict orders, and so the
            # instruction counts, repeat.
            env={**os.environ, "PYTHONMALLOC": "malloc", "PYTHONHASHSEED": "0"},
        )  # fmt: skip
        text = out.read_text()
    match = re.search(r"^summary:\s+(\d+)", text, re.MULTILINE) or re.search(
        r"^totals:\s+(\d+)", text, re.MULTILINE
    )
    assert match, "no instruction total in callgrind output"
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--operations", type=int, default=300)
    parser.add_argument("--workload", choices=WORKLOADS, action="append")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*json.loads(args.child))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind not found (Debian: apt-get install valgrind)")
        return 0
    with tempfile.TemporaryDirectory() as directory:
        print(f"instructions per operation (callgrind, {args.operations} operations)")
        for workload in args.workload or WORKLOADS:
            print(f"\n{workload}")
            header = f"{'instr/op':>10} {'+instr/op':>10} {'ratio':>7}"
            print(f"  {'configuration':26} {header}")
            baseline = None
            for config in CONFIGS:
                url = f"sqlite:///{Path(directory) / 'bench.sqlite'}"
                idle = _instructions(workload, config, 0, url)
                busy = _instructions(workload, config, args.operations, url)
                per_op = (busy - idle) / args.operations
                baseline = baseline or per_op
                print(
                    f"  {config:26} {per_op:10.0f} {per_op - baseline:+10.0f} "
                    f"{per_op / baseline:7.2f}x"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
