"""
Overhead of sessionguard against an unguarded baseline measured in the same run.

    python benchmarks/run.py [--repeat 7] [--statements 2000] [--database-url URL]
    python benchmarks/run.py --calls

Each workload runs on the same engine and data with no guard (baseline) and
with guards of several configurations; the report gives the median time per
operation, the extra microseconds per operation and the ratio to the
baseline. Targets are checked here and printed, never asserted by tests
(TARGETS below):

- an unsampled ORM statement (sample_rate=0.0) adds < 10 us: next to nothing
  beside a database round trip (SQLAlchemy's own do_orm_execute dispatch is
  part of it);
- a sampled statement with one identity-map hit costs < 4x the baseline: the
  check is one extra SELECT on the same connection (on PostgreSQL inside a
  SAVEPOINT, two more round trips), so this is what sampling is for.

``--calls`` prints Python function calls per operation instead (cProfile's
deterministic count): the same from run to run on any machine, for comparing
changes to the hot path when wall-clock times are blurred by other load.

Exit status 0 always: the numbers are for reading, not for failing a build.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sessionguard import install_guard


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    price: Mapped[int]


Workload = Callable[[Session, int], None]


def select_one_hit(session: Session, n: int) -> None:
    """n ORM selects, each returning one object already in the identity map."""
    statement = select(Item).where(Item.id == 1)
    for _ in range(n):
        session.scalars(statement).one()


def select_hundred_hits(session: Session, n: int) -> None:
    """n ORM selects, each returning 100 objects already in the identity map."""
    statement = select(Item).where(Item.id <= 100)
    for _ in range(n):
        session.scalars(statement).all()


def get_hit(session: Session, n: int) -> None:
    """n Session.get() calls answered from the identity map (no SQL)."""
    for _ in range(n):
        session.get(Item, 1)


WORKLOADS: dict[str, tuple[Workload, int]] = {
    # name: (workload, operations per unit of --statements)
    "select, 1 hit": (select_one_hit, 1),
    "select, 100 hits": (select_hundred_hits, 10),
    "get(), map hit": (get_hit, 1),
}

# (workload, configuration) -> (what is promised, a check of (us/op, ratio))
TARGETS: dict[tuple[str, str], tuple[str, Callable[[float, float], bool]]] = {
    ("select, 1 hit", "guard, sample_rate=0.0"): (
        "< +10 us",
        lambda extra, ratio: extra < 10.0,
    ),
    ("select, 100 hits", "guard, sample_rate=0.0"): (
        "< +10 us",
        lambda extra, ratio: extra < 10.0,
    ),
    ("get(), map hit", "guard, sample_rate=0.0"): (
        "< +10 us",
        lambda extra, ratio: extra < 10.0,
    ),
    ("select, 1 hit", "guard, sample_rate=1.0"): (
        "< 4x",
        lambda extra, ratio: ratio < 4.0,
    ),
}

CONFIGS: dict[str, dict[str, Any] | None] = {
    "baseline (no guard)": None,
    "guard, detection off": {"detect_stale_reads": False},
    "guard, sample_rate=0.0": {"sample_rate": 0.0},
    "guard, sample_rate=0.1": {"sample_rate": 0.1},
    "guard, sample_rate=1.0": {},
}


def _setup(url: str) -> Any:
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(Item(id=i, name=f"item {i}", price=i) for i in range(1, 101))
        session.commit()
    return engine


def _measure(
    engine: Any, workload: Workload, ops: int, config: dict[str, Any] | None
) -> float:
    """Seconds for *ops* operations of *workload*, with the objects held in the map."""
    guard = install_guard(engine, **config) if config is not None else None
    try:
        with Session(engine, expire_on_commit=False) as session:
            held = session.scalars(select(Item)).all()  # the map is weak: hold them
            workload(session, 10)  # warm caches (statement compilation, ...)
            gc.collect()
            gc.disable()
            try:
                started = time.perf_counter()
                workload(session, ops)
                elapsed = time.perf_counter() - started
            finally:
                gc.enable()
            del held
    finally:
        if guard is not None:
            guard.uninstall()
    return elapsed


def _calls(
    engine: Any, workload: Workload, ops: int, config: dict[str, Any] | None
) -> float:
    """Python function calls per operation of *workload* (deterministic)."""
    import cProfile
    import pstats

    guard = install_guard(engine, **config) if config is not None else None
    try:
        with Session(engine, expire_on_commit=False) as session:
            held = session.scalars(select(Item)).all()
            workload(session, 10)
            profile = cProfile.Profile()
            profile.enable()
            workload(session, ops)
            profile.disable()
            del held
    finally:
        if guard is not None:
            guard.uninstall()
    calls: int = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
    return calls / ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--statements", type=int, default=2000)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--calls", action="store_true")
    args = parser.parse_args(argv)
    # Measure the guard, not a console renderer: drop log events below warning.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30),
        cache_logger_on_first_use=True,
    )
    with tempfile.TemporaryDirectory() as directory:
        url = args.database_url or f"sqlite:///{Path(directory) / 'bench.sqlite'}"
        engine = _setup(url)
        print(
            f"sessionguard overhead on {engine.dialect.name}, "
            f"median of {args.repeat} runs; times per operation"
        )
        for workload_name, (workload, divisor) in WORKLOADS.items():
            ops = max(1, args.statements // divisor)
            print(f"\n{workload_name} ({ops} operations)")
            unit = "calls/op" if args.calls else "us/op"
            print(f"  {'configuration':26} {unit:>9} {'+' + unit:>9} {'ratio':>7}")
            if args.calls:
                baseline_calls = _calls(engine, workload, ops, None)
                for config_name, config in CONFIGS.items():
                    per_op = _calls(engine, workload, ops, config)
                    print(
                        f"  {config_name:26} {per_op:9.1f} "
                        f"{per_op - baseline_calls:+9.1f} "
                        f"{per_op / baseline_calls:7.2f}x"
                    )
                continue
            # Configurations take turns within each round, so that a burst of
            # load on the machine hits them all alike.
            times: dict[str, list[float]] = {name: [] for name in CONFIGS}
            for _ in range(args.repeat):
                for config_name, config in CONFIGS.items():
                    times[config_name].append(_measure(engine, workload, ops, config))
            baseline = statistics.median(times["baseline (no guard)"]) / ops * 1e6
            for config_name in CONFIGS:
                per_op = statistics.median(times[config_name]) / ops * 1e6
                extra, ratio = per_op - baseline, per_op / baseline
                target = TARGETS.get((workload_name, config_name))
                verdict = ""
                if target is not None:
                    promise, check = target
                    met = "met" if check(extra, ratio) else "MISSED"
                    verdict = f"  target {promise}: {met}"
                print(
                    f"  {config_name:26} {per_op:9.1f} {extra:+9.1f} "
                    f"{ratio:7.2f}x{verdict}"
                )
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
