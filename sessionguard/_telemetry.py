"""
Turns what the guard observes into structlog events and OpenTelemetry signals.

This is the only module that talks to logging and OpenTelemetry (the
transaction listener reads two of the API's flags itself, see
``provider_maybe_set``). The detector hands it findings; the guard's
listeners hand it transaction boundaries. Only ``opentelemetry-api`` is used:
without an SDK the API's no-op providers make all of it nearly free, and span
attributes are only computed for a recording span.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import structlog
import structlog._config
from opentelemetry import metrics, trace
from opentelemetry.metrics import Observation
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._config import LOG_LEVELS
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider
    from opentelemetry.trace import Span
    from sqlalchemy.engine import Dialect

    from ._config import GuardConfig
    from ._findings import Finding, StaleRead

__all__ = ["DB_SYSTEM_NAMES", "SPAN_NAME", "Telemetry", "db_system_name"]

SPAN_NAME = "session transaction"
SCOPE = "sessionguard"

# SQLAlchemy dialect names -> OpenTelemetry `db.system.name` values.
DB_SYSTEM_NAMES = {
    "postgresql": "postgresql",
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mariadb",
    "mssql": "microsoft.sql_server",
    "oracle": "oracle.db",
    "cockroachdb": "cockroachdb",
}


# Advisory histogram boundaries (the SDK's defaults, 0-10000, put every
# sub-second duration into one bucket). A View configured by the user wins.
SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
OBJECTS_BUCKETS = (
    0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 100000,
)  # fmt: skip


def db_system_name(dialect: Dialect | str) -> str:
    """The semantic-conventions ``db.system.name`` for a SQLAlchemy dialect.

    Given the dialect itself, a ``mysql://`` URL that reached a MariaDB server is
    ``mariadb``: the MySQL dialect keeps its name and says so in ``is_mariadb``
    once connected. Given only a name, that cannot be told.
    """
    if isinstance(dialect, str):
        return DB_SYSTEM_NAMES.get(dialect, "other_sql")
    if getattr(dialect, "is_mariadb", False):
        return "mariadb"
    return DB_SYSTEM_NAMES.get(dialect.name, "other_sql")


# Whether a provider may have been set globally, read on every transaction
# while nothing records: plain attribute reads, no call. The API's ProxyTracer
# starts to record once ``trace._TRACER_PROVIDER`` is set (by
# set_tracer_provider() or by a test assigning it); proxy meters only through
# set_meter_provider(), which flips its Once flag. Looked up in their modules
# each time (a test may put fresh ones there). Without them (another API
# version), every transaction asks went_live().
PROVIDER_FLAGS = hasattr(trace, "_TRACER_PROVIDER") and hasattr(
    metrics_internal, "_METER_PROVIDER_SET_ONCE"
)


def provider_maybe_set() -> bool:
    """Whether a tracer or meter provider may have been set globally."""
    return (
        not PROVIDER_FLAGS
        or trace._TRACER_PROVIDER is not None
        or metrics_internal._METER_PROVIDER_SET_ONCE._done
    )


def _recording(provided: object) -> tuple[bool, bool]:
    """
    (whether *provided*, a tracer or meter, can record now, whether it may
    start to later). Anything not known to be inert counts as recording.
    """
    if isinstance(provided, (trace.NoOpTracer, metrics.NoOpMeter)):
        return False, False
    if type(provided) is trace.ProxyTracer:
        real = getattr(provided, "_real_tracer", True)
        return bool(real or getattr(trace, "_TRACER_PROVIDER", True)), True
    if type(provided).__name__ == "_ProxyMeter":
        return getattr(provided, "_real_meter", True) is not None, True
    return True, False


_OUTCOMES = (("commit", 1), ("rollback", 2))  # outcome, index in the counts


class _TransactionCounter:
    """
    ``sessionguard.transactions`` on one meter provider, for every guard.

    An asynchronous Counter (OpenTelemetry's instrument for counts kept by
    the application): the sessions count their transactions anyway, and a
    synchronous add() per transaction would cost as much as the rest of an
    unsampled transaction. The exported data is the same monotonic sum. One
    instrument per provider, whatever the number of guards: the SDK keeps the
    callbacks of the first instrument of a name and ignores a second's.
    """

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._sources: dict[int, weakref.ref[Telemetry]] = {}
        # Guards uninstalled, whose counts are not moved to _closed yet (an
        # uninstall may run in the garbage collector, inside _observe() on
        # this very thread: it never waits for the lock).
        self._closing: list[Telemetry] = []
        # Counts of guards uninstalled since: a cumulative counter never goes
        # back. (outcome, db.system.name) -> transactions
        self._closed: dict[tuple[str, str], int] = {}
        meter.create_observable_counter(
            "sessionguard.transactions",
            callbacks=[self._observe],
            unit="{transaction}",
            description="Session transactions, by outcome.",
        )

    def add(self, telemetry: Telemetry) -> None:
        with self._lock:
            self._sources[id(telemetry)] = weakref.ref(telemetry)

    def remove(self, telemetry: Telemetry) -> None:
        """*telemetry*'s guard is uninstalled: keep its counts, stop asking."""
        self._closing.append(telemetry)
        if self._lock.acquire(blocking=False):
            try:
                self._settle()
            finally:
                self._lock.release()
        # Otherwise whoever holds the lock, or the next caller, settles it;
        # until then its counts are still read from the guard.

    def _settle(self) -> None:
        """Move the counts of uninstalled guards to _closed (lock held)."""
        while self._closing:
            telemetry = self._closing.pop()
            if self._sources.pop(id(telemetry), None) is not None:
                self._add(self._closed, telemetry)

    @staticmethod
    def _add(totals: dict[tuple[str, str], int], telemetry: Telemetry) -> None:
        source = telemetry.transaction_counts
        if source is None:
            return
        for system, counts in source().items():
            for outcome, index in _OUTCOMES:
                if counts[index]:
                    key = (outcome, system)
                    totals[key] = totals.get(key, 0) + counts[index]

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            self._settle()
            totals = dict(self._closed)
            for reference in list(self._sources.values()):
                telemetry = reference()
                if telemetry is not None:
                    self._add(totals, telemetry)
        return [
            Observation(
                count, {"sessionguard.outcome": outcome, "db.system.name": system}
            )
            for (outcome, system), count in totals.items()
        ]


_counters_lock = threading.Lock()
_transaction_counters: weakref.WeakKeyDictionary[Any, _TransactionCounter] = (
    weakref.WeakKeyDictionary()
)


def _transaction_counter(provider: MeterProvider, meter: Meter) -> _TransactionCounter:
    """The one ``sessionguard.transactions`` instrument of *provider*."""
    with _counters_lock:
        counter = _transaction_counters.get(provider)
        if counter is not None:
            return counter
        # A guard installed before the SDK was set up made its instrument on
        # the API's proxy provider, which now hands it to this provider: one
        # instrument of that name per real provider, so share it.
        proxy = getattr(metrics_internal, "_PROXY_METER_PROVIDER", None)
        shared = _transaction_counters.get(proxy) if proxy is not None else None
        if (
            shared is not None
            and getattr(proxy, "_real_meter_provider", None) is provider
        ):
            _transaction_counters[provider] = shared
            return shared
        counter = _TransactionCounter(meter)
        # A provider that takes no weak reference: one instrument per guard.
        with contextlib.suppress(TypeError):
            _transaction_counters[provider] = counter
        return counter


class Telemetry:
    """The sinks of one guard: its structlog logger, tracer and instruments."""

    def __init__(self, config: GuardConfig) -> None:
        # Events below the level are not built at all: the per-transaction
        # lines are on the hot path, and a library is quiet unless asked.
        level = LOG_LEVELS[config.log_level]
        self.debug_on = level <= LOG_LEVELS["debug"]
        self.warning_on = level <= LOG_LEVELS["warning"]
        self.error_on = level <= LOG_LEVELS["error"]
        self._given_logger: Any = config.logger
        self.transaction_counts: Callable[[], dict[str, list[int]]] | None = None
        self._bound: Any = None
        self._bound_for: tuple[object, object] | None = None
        self._log_values = config.log_values
        # Looked up now (install time): an application that configures its SDK
        # first and installs the guard second gets its providers.
        tracer_provider = config.tracer_provider or trace.get_tracer_provider()
        meter_provider = config.meter_provider or metrics.get_meter_provider()
        self.tracer = tracer_provider.get_tracer(SCOPE, __version__)
        meter = meter_provider.get_meter(SCOPE, __version__)
        self._meter = meter
        # Whether a span or a measurement can be recorded at all. With the
        # API's no-op providers nothing can, and a transaction then skips its
        # telemetry entirely; the API's proxies (nothing set globally yet)
        # can start recording once an SDK is set, which went_live() notices.
        tracer_live, tracer_later = _recording(self.tracer)
        meter_live, meter_later = _recording(meter)
        self.live = tracer_live or meter_live
        self.may_go_live = tracer_later or meter_later
        # What a transaction's listeners ask first: anything to record?
        self.active = self.live or self.debug_on
        self._transactions = _transaction_counter(meter_provider, meter)
        self.transaction_duration = meter.create_histogram(
            "sessionguard.transaction.duration",
            unit="s",
            description="Duration of session transactions.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.identity_map_size = meter.create_histogram(
            "sessionguard.identity_map.size",
            unit="{object}",
            description="Objects in the identity map when a transaction ends.",
            explicit_bucket_boundaries_advisory=OBJECTS_BUCKETS,
        )
        self.identity_map_hits = meter.create_counter(
            "sessionguard.identity_map.hits",
            unit="{object}",
            description="Objects served from the identity map with cached attributes.",
        )
        self.verifications = meter.create_counter(
            "sessionguard.verifications",
            unit="{object}",
            description="Objects checked against the database.",
        )
        self.stale_reads = meter.create_counter(
            "sessionguard.stale_reads",
            unit="{read}",
            description="Objects served from the identity map whose row had changed.",
        )
        self.expire_all = meter.create_counter(
            "sessionguard.expire_all",
            unit="{call}",
            description="Enforced expiry of a session, by reason.",
        )
        self.findings = meter.create_counter(
            "sessionguard.findings",
            unit="{finding}",
            description="Findings of every kind.",
        )
        self.verification_duration = meter.create_histogram(
            "sessionguard.verification.duration",
            unit="s",
            description="Time spent checking identity-map hits against the database.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )

    def went_live(self) -> bool:
        """Whether telemetry can record now (and from now on)."""
        if self.live:
            return True
        if not self.may_go_live or not provider_maybe_set():
            # The API's proxies start to record once a provider is set globally.
            return False
        tracer_live, tracer_later = _recording(self.tracer)
        meter_live, meter_later = _recording(self._meter)
        self.live = tracer_live or meter_live
        self.may_go_live = tracer_later or meter_later
        self.active = self.live or self.debug_on
        return self.live

    def count_transactions(self, source: Callable[[], dict[str, list[int]]]) -> None:
        """
        Report *source*'s counts as ``sessionguard.transactions``: what the
        guard's sessions counted, by db.system.name (transactions, commits,
        rollbacks, statements), never reset.
        """
        self.transaction_counts = source
        self._transactions.add(self)

    def close(self) -> None:
        """The guard is uninstalled: its counts stay, nothing more is asked."""
        self._transactions.remove(self)

    @property
    def log(self) -> Any:
        """
        The logger, resolved once.

        structlog's default logger is a lazy proxy that binds a new logger at
        every call; bind it once instead, on first use (as structlog's own
        ``cache_logger_on_first_use`` does), and again only when structlog is
        reconfigured (``structlog.configure()``, ``capture_logs()``).
        """
        if self._given_logger is not None:
            return self._given_logger
        current = structlog._config._CONFIG
        processors, factory = current.default_processors, current.logger_factory
        bound_for = self._bound_for
        if (
            bound_for is None
            or bound_for[0] is not processors
            or bound_for[1] is not factory
        ):
            self._bound = structlog.get_logger("sessionguard").bind()
            self._bound_for = (processors, factory)
        return self._bound

    # -- transactions ---------------------------------------------------------

    def transaction_begun(
        self, session_id: int, identity_map_size: int, sampled: bool
    ) -> Span | None:
        """A transaction began; its span when it is *sampled*."""
        if self.debug_on:
            self.log.debug(
                "session.begin",
                session_id=session_id,
                identity_map_size=identity_map_size,
            )
        if not sampled:
            return None
        return self.tracer.start_span(SPAN_NAME, kind=SpanKind.INTERNAL)

    def late_span(self, began_at: float) -> Span:
        """
        The span of an unsampled transaction in which something was found:
        started now, as of *began_at* (``time.perf_counter()`` at begin),
        child of the current context.
        """
        started = time.time_ns() - int((time.perf_counter() - began_at) * 1e9)
        return self.tracer.start_span(
            SPAN_NAME, kind=SpanKind.INTERNAL, start_time=started
        )

    def transaction_ended(  # noqa: PLR0917 - positional: once per transaction
        self,
        span: Span | None,
        sampled: bool,
        session_id: int,
        outcome: str,
        identity_map_size: int,
        statements: int,
        duration_s: float,
        system: str,
        namespace: str | None,
        stale_reads: int,
    ) -> None:
        if self.debug_on:
            self.log.debug(
                f"session.{outcome}",
                session_id=session_id,
                identity_map_size=identity_map_size,
                statements=statements,
                duration_ms=round(duration_s * 1000.0, 3),
            )
        if sampled:
            self.transaction_duration.record(
                duration_s,
                {"sessionguard.outcome": outcome, "db.system.name": system},
            )
            self.identity_map_size.record(identity_map_size, {"db.system.name": system})
        if span is None:
            return
        if span.is_recording():
            span.set_attributes(
                {
                    "db.system.name": system,
                    "sessionguard.outcome": outcome,
                    "sessionguard.identity_map.size": identity_map_size,
                    "sessionguard.statements": statements,
                    "sessionguard.stale_reads": stale_reads,
                }
            )
            if namespace:
                span.set_attribute("db.namespace", namespace)
        span.end()

    def expired(
        self, session_id: int, reason: str, objects: int, kept_modified: int
    ) -> None:
        if self.debug_on:
            self.log.debug(
                "expire_all",
                session_id=session_id,
                reason=reason,
                objects=objects,
                kept_modified=kept_modified,
            )
        self.expire_all.add(1, {"sessionguard.reason": reason})

    # -- detection --------------------------------------------------------------

    def checked(
        self,
        system: str,
        hits: dict[str, int],
        verified: dict[str, int],
        duration_s: float | None,
    ) -> None:
        for entity, count in hits.items():
            self.identity_map_hits.add(count, {"sessionguard.entity": entity})
        for entity, count in verified.items():
            self.verifications.add(count, {"sessionguard.entity": entity})
        if duration_s is not None:
            self.verification_duration.record(duration_s, {"db.system.name": system})

    def finding(self, finding: Finding, span: Span | None, system: str | None) -> None:
        if self.warning_on:
            fields = finding.to_dict()
            event = fields.pop("kind")
            self.log.warning(event, **fields)
        self.findings.add(1, {"sessionguard.kind": finding.kind})
        if finding.kind != "stale_read":
            return
        stale: StaleRead = finding  # type: ignore[assignment]
        self.stale_reads.add(
            1,
            {
                "sessionguard.entity": stale.entity,
                "db.system.name": system or "other_sql",
            },
        )
        if span is not None and span.is_recording():
            attributes: dict[str, Any] = {
                "sessionguard.entity": stale.entity,
                "sessionguard.attributes": [diff.name for diff in stale.attributes],
                "sessionguard.deleted": stale.deleted,
            }
            if self._log_values:
                attributes["sessionguard.identity"] = [str(v) for v in stale.identity]
            if stale.location:
                path, _, line = stale.location.rpartition(":")
                attributes["code.file.path"] = path
                if line.isdigit():
                    attributes["code.line.number"] = int(line)
            span.add_event("sessionguard.stale_read", attributes)

    def stale_error(self, span: Span | None, error: BaseException) -> None:
        if span is not None and span.is_recording():
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))

    def verification_error(
        self, session_id: int, entity: str, error: BaseException
    ) -> None:
        if self.error_on:
            self.log.error(
                "verification_error",
                session_id=session_id,
                entity=entity,
                error=f"{type(error).__name__}: {error}",
            )

    def internal_error(self, where: str, error: BaseException) -> None:
        if self.error_on:
            self.log.error(
                "internal_error",
                where=where,
                error=f"{type(error).__name__}: {error}",
                exc_info=error,
            )
