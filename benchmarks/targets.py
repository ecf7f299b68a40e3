"""
The targets of issue 10, in one place. ``run.py --check`` evaluates them.

Ratios are medians over rounds of (time of the configuration / time of the
baseline in the same round). A target names the database dialect it holds
for; ``None`` means every database measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol


class Measured(Protocol):
    """What the targets read, for one database; ``None`` when not measured."""

    def ratio(self, workload: str, configuration: str) -> float | None: ...

    def memory_growth(self, configuration: str, statements: int) -> float | None:
        """Growth in bytes, if measured over at least *statements* statements."""


Reading = Callable[[Measured], "float | None"]


@dataclasses.dataclass(frozen=True)
class Target:
    text: str
    dialect: str | None
    measured: Reading
    limit: Reading
    strict: bool = False
    """``measured < limit``; otherwise ``measured <= limit``."""
    unit: str = "ratio"
    floor: Reading | None = None
    """What no guard can beat in the same run: the configuration that does only
    what the target's configuration must do (``floor``, ``check-floor``,
    ``telemetry-floor``). A floor above the limit means the limit is out of
    reach for any guard in that run."""

    def verdict(self, measured: float | None, limit: float | None) -> str:
        if measured is None or limit is None:
            return "not measured"
        met = measured < limit if self.strict else measured <= limit
        return "pass" if met else "FAIL"


def _ratio(workload: str, configuration: str) -> Reading:
    return lambda m: m.ratio(workload, configuration)


def _constant(value: float) -> Reading:
    return lambda m: value


def _plus(reading: Reading, margin: float) -> Reading:
    def limit(m: Measured) -> float | None:
        value = reading(m)
        return None if value is None else value + margin

    return limit


def _size_drift(configuration: str) -> Reading:
    """
    |ratio with 10,000 objects held / ratio with 10 - 1|, on W2.

    Issue 10 wrote this on W1. There, SQLAlchemy's own expiry of every held
    object at each commit makes the baseline about 80 times slower with
    10,000 objects, so a guard's unchanged cost shrinks in the ratio and the
    drift is the guard's whole 10-object overhead: the target then only
    holds for a guard under 1.05 on W1, tighter than the W1 targets
    themselves. And W1 has no identity-map hit, so nothing that could grow
    with the map (the hit detection, the check) runs there. W2 reads the
    same rows with every read a hit, and its baseline does not grow with the
    map: the ratio there moves only if the guard's cost does. (run.py
    prints the W1 drift beside it.)
    """

    def drift(m: Measured) -> float | None:
        large = m.ratio("W2-10k", configuration)
        small = m.ratio("W2", configuration)
        if large is None or small is None:
            return None
        return abs(large / small - 1.0)

    return drift


MEGABYTE = 1_000_000
MEMORY_STATEMENTS = 100_000
"""A memory measurement of fewer statements does not count for the target."""

TARGETS: tuple[Target, ...] = (
    Target(
        "W1 guard-0 <= floor + 0.05",
        "sqlite",
        _ratio("W1", "guard-0"),
        _plus(_ratio("W1", "floor"), 0.05),
        floor=_ratio("W1", "floor"),
    ),
    Target(
        "W3 guard-0 <= floor + 0.05",
        "sqlite",
        _ratio("W3", "guard-0"),
        _plus(_ratio("W3", "floor"), 0.05),
        floor=_ratio("W3", "floor"),
    ),
    Target(
        "W1 guard-1pct-sdk <= 1.30",
        "sqlite",
        _ratio("W1", "guard-1pct-sdk"),
        _constant(1.30),
        floor=_ratio("W1", "telemetry-floor"),
    ),
    Target(
        "W3 guard-1pct-sdk <= 1.15",
        "sqlite",
        _ratio("W3", "guard-1pct-sdk"),
        _constant(1.15),
        floor=_ratio("W3", "telemetry-floor"),
    ),
    *(
        Target(
            f"{workload} guard-1pct-sdk < otel-sqlalchemy",
            "sqlite",
            _ratio(workload, "guard-1pct-sdk"),
            _ratio(workload, "otel-sqlalchemy"),
            strict=True,
            floor=_ratio(workload, "telemetry-floor"),
        )
        for workload in ("W1", "W2", "W3")
    ),
    Target(
        "W1 guard-100 <= 1.20",
        "sqlite",
        _ratio("W1", "guard-100"),
        _constant(1.20),
        floor=_ratio("W1", "floor"),
    ),
    Target(
        "W3 guard-100 <= 1.25",
        "sqlite",
        _ratio("W3", "guard-100"),
        _constant(1.25),
        floor=_ratio("W3", "check-floor"),
    ),
    Target(
        "W2 guard-100 <= 1.80",
        "sqlite",
        _ratio("W2", "guard-100"),
        _constant(1.80),
        floor=_ratio("W2", "check-floor"),
    ),
    Target(
        "W1 guard-1pct-sdk <= 1.05",
        "postgresql",
        _ratio("W1", "guard-1pct-sdk"),
        _constant(1.05),
        floor=_ratio("W1", "telemetry-floor"),
    ),
    *(
        Target(
            f"W2 {configuration}: 10,000 vs 10 objects held, ratios within 5 %",
            # Issue 10 sets its targets on in-memory SQLite (PostgreSQL's has
            # its own line). Over loopback the two medians compared here each
            # move by more than 5 % from run to run on a shared machine, with
            # the bytecodes the guard adds identical at both sizes (--opcodes):
            # run.py prints the PostgreSQL drift, it does not judge it.
            "sqlite",
            _size_drift(configuration),
            _constant(0.05),
            unit="|r10k/r10 - 1|",
        )
        for configuration in ("guard-0", "guard-100")
    ),
    Target(
        "memory: 100,000 statements, guard-100, growth < 1 MB",
        None,
        lambda m: m.memory_growth("guard-100", MEMORY_STATEMENTS),
        _constant(MEGABYTE),
        strict=True,
        unit="bytes",
    ),
)
