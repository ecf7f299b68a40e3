"""
The configurations a benchmark worker can run, and the logging every worker
shares.

Each configuration is installed once in its own worker process, on that
worker's engine, before anything is timed; ``Installed.after_batch`` runs
between timed batches (never inside one).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import event
from sqlalchemy.orm import Session

from workloads import Check, HandCheck

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Engine

    from sessionguard import Guard


@dataclasses.dataclass(frozen=True)
class Configuration:
    name: str
    description: str
    install: Callable[[Engine], Installed]


@dataclasses.dataclass
class Installed:
    check: Check | None = None
    guard: Guard | None = None
    after_batch: Callable[[], None] = lambda: None


def configure_logging() -> None:
    """
    The same structlog setup in every worker, so that logging costs alike
    everywhere: a production-style JSON chain behind a level filter at INFO,
    loggers cached on first use, written to the null device.
    """
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(
            file=open(os.devnull, "w")  # noqa: SIM115 -- lives as long as the worker
        ),
        cache_logger_on_first_use=True,
    )


def _baseline(engine: Engine) -> Installed:
    return Installed()


def _no_op(*args: Any, **kwargs: Any) -> None:
    pass


_FLOOR_EVENTS = (
    "after_begin",
    "after_commit",
    "after_rollback",
    "after_transaction_end",
    "do_orm_execute",
)


def _floor(engine: Engine) -> Installed:
    for name in _FLOOR_EVENTS:
        event.listen(Session, name, _no_op)
    return Installed()


def _check_floor(engine: Engine) -> Installed:
    return Installed(check=HandCheck(engine.dialect))


def _guard(sample_rate: float, sdk: bool) -> Callable[[Engine], Installed]:
    def install(engine: Engine) -> Installed:
        from sessionguard import install_guard

        if not sdk:
            guard = install_guard(engine, sample_rate=sample_rate)
            return Installed(guard=guard)
        tracer_provider, meter_provider, after_batch = _sdk()
        guard = install_guard(
            engine,
            sample_rate=sample_rate,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        return Installed(guard=guard, after_batch=after_batch)

    return install


def _telemetry_floor(engine: Engine) -> Installed:
    """
    What DESIGN §4 asks of a transaction at ``sample_rate=0.01``, and nothing
    else: every transaction counted (a number per outcome, reported through
    an observable counter, as ``sessionguard.transactions`` is), and one in a
    hundred traced: one span (started at begin, five attributes set and
    ended at commit or rollback) and the two histograms
    (``sessionguard.transaction.duration``, ``sessionguard.identity_map.size``),
    through the same SDK, from the floor's listeners. A guard with the SDK at
    1 % cannot cost less; its own share is what it adds on top.
    """
    from opentelemetry.metrics import Observation
    from opentelemetry.trace import SpanKind

    tracer_provider, meter_provider, after_batch = _sdk()
    tracer = tracer_provider.get_tracer("telemetry-floor")
    meter = meter_provider.get_meter("telemetry-floor")
    system = {"db.system.name": engine.dialect.name}
    counted = {"commit": 0, "rollback": 0}
    meter.create_observable_counter(
        "sessionguard.transactions",
        callbacks=[
            lambda options: [
                Observation(count, {"sessionguard.outcome": outcome, **system})
                for outcome, count in counted.items()
            ]
        ],
    )
    duration = meter.create_histogram("sessionguard.transaction.duration", unit="s")
    size = meter.create_histogram("sessionguard.identity_map.size")
    sampler = random.Random(20240610)
    open_transactions: dict[int, tuple[Any, float]] = {}

    def begin(session: Session, transaction: Any, connection: Any) -> None:
        if transaction.parent is None:
            span = None
            if sampler.random() < 0.01:
                span = tracer.start_span("session transaction", kind=SpanKind.INTERNAL)
            open_transactions[session.hash_key] = (span, time.perf_counter())

    def end(session: Session, outcome: str) -> None:
        entry = open_transactions.pop(session.hash_key, None)
        if entry is None:
            return
        counted[outcome] += 1
        span, began = entry
        if span is None:
            return
        objects = len(session.identity_map)
        span.set_attributes(
            {
                **system,
                "sessionguard.outcome": outcome,
                "sessionguard.identity_map.size": objects,
                "sessionguard.statements": 1,
                "sessionguard.stale_reads": 0,
            }
        )
        span.end()
        duration.record(
            time.perf_counter() - began, {"sessionguard.outcome": outcome, **system}
        )
        size.record(objects, system)

    event.listen(Session, "after_begin", begin)
    event.listen(Session, "after_commit", lambda session: end(session, "commit"))
    event.listen(Session, "after_rollback", lambda session: end(session, "rollback"))
    event.listen(Session, "after_transaction_end", _no_op)
    event.listen(Session, "do_orm_execute", _no_op)
    return Installed(after_batch=after_batch)


def _otel_sqlalchemy(engine: Engine) -> Installed:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    tracer_provider, meter_provider, after_batch = _sdk()
    # The instrumentation declares sqlalchemy < 2.1 and refuses 2.1 without this.
    SQLAlchemyInstrumentor().instrument(
        engine=engine,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        skip_dep_check=True,
    )
    return Installed(after_batch=after_batch)


def _sdk() -> tuple[Any, Any, Callable[[], None]]:
    """
    The OpenTelemetry SDK as a service would run it, exporting to memory:
    (tracer provider, meter provider, what to do between batches). The
    providers are passed in, never set as the globals.
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])

    def after_batch() -> None:
        # Export what is queued and drop it, so that finished spans do not
        # pile up in memory from batch to batch.
        tracer_provider.force_flush()
        exporter.clear()

    return tracer_provider, meter_provider, after_batch


CONFIGURATIONS: dict[str, Configuration] = {
    configuration.name: configuration
    for configuration in (
        Configuration("baseline", "no guard", _baseline),
        Configuration(
            "floor",
            "no-op listeners on Session " + ", ".join(_FLOOR_EVENTS),
            _floor,
        ),
        Configuration(
            "check-floor",
            "no guard; the guard's verification SELECT run by hand for each "
            "identity-map hit",
            _check_floor,
        ),
        Configuration(
            "guard-0",
            "install_guard(engine, sample_rate=0.0), no SDK",
            _guard(0.0, False),
        ),
        Configuration(
            "guard-1pct-sdk",
            "install_guard(engine, sample_rate=0.01) with the OpenTelemetry SDK",
            _guard(0.01, True),
        ),
        Configuration(
            "guard-100",
            "install_guard(engine, sample_rate=1.0), no SDK",
            _guard(1.0, False),
        ),
        Configuration(
            "telemetry-floor",
            "no guard; the floor's listeners making what DESIGN §4 asks of a "
            "transaction at 1 % (every one counted, one in a hundred traced), "
            "with the SDK",
            _telemetry_floor,
        ),
        Configuration(
            "otel-sqlalchemy",
            "opentelemetry-instrumentation-sqlalchemy on the engine, same SDK",
            _otel_sqlalchemy,
        ),
    )
}
