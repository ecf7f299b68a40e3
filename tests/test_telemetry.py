"""OpenTelemetry spans and metrics, with the SDK's in-memory exporter and reader."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import NonRecordingSpan, SpanKind, StatusCode
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.orm import Session

from sessionguard import Guard, StaleReadError, install_guard
from sessionguard._version import __version__

from .models import Address, User


class Otel:
    """An SDK tracer and meter provider with in-memory exporter and reader."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def install(self, target: Any, **options: Any) -> Guard:
        """install_guard(target) exporting to these providers."""
        return install_guard(
            target,
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            **options,
        )

    def spans(self, name: str = "session transaction") -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def metrics(self) -> dict[str, Any]:
        """Metric name -> (unit, data points) of everything recorded."""
        data = self.reader.get_metrics_data()
        found: dict[str, Any] = {}
        assert data is not None
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                assert scope_metrics.scope.name == "sessionguard"
                assert scope_metrics.scope.version == __version__
                for metric in scope_metrics.metrics:
                    found[metric.name] = metric
        return found

    def points(self, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        metric = self.metrics()[name]
        return {
            tuple(sorted(point.attributes.items())): point
            for point in metric.data.data_points
        }


@pytest.fixture
def otel() -> Otel:
    return Otel()


def _stale_workload(db: Any, session: Session) -> User:
    """Load user 1, commit, rename it elsewhere: the next read is stale."""
    user = session.get(User, 1)
    assert user is not None
    session.commit()
    with db.engine().begin() as connection:
        connection.execute(update(User).where(User.id == 1).values(name="bob"))
    return user


def test_transaction_span_shape(db, seed, otel):
    """One INTERNAL 'session transaction' span per transaction, child of the current span."""
    seed(db)
    engine = db.engine()
    otel.install(engine)
    tracer = otel.tracer_provider.get_tracer("test")
    session = Session(engine, expire_on_commit=False)
    with tracer.start_as_current_span("request") as request_span:
        users = session.scalars(select(User)).all()
        addresses = session.scalars(select(Address)).all()
        session.commit()
    session.scalars(select(User)).all()
    session.rollback()
    first, second = otel.spans()
    assert first.kind is SpanKind.INTERNAL
    assert first.parent is not None
    assert first.parent.span_id == request_span.get_span_context().span_id
    assert second.parent is None
    assert first.instrumentation_scope.name == "sessionguard"
    assert first.instrumentation_scope.version == __version__
    assert dict(first.attributes) == {
        "db.system.name": db.name,
        "db.namespace": engine.url.database,
        "sessionguard.outcome": "commit",
        "sessionguard.identity_map.size": 2,
        "sessionguard.statements": 2,
        "sessionguard.stale_reads": 0,
    }
    assert second.attributes["sessionguard.outcome"] == "rollback"
    assert second.attributes["sessionguard.statements"] == 1
    assert first.status.status_code is StatusCode.UNSET
    session.close()
    del users, addresses


def test_stale_read_span_event_and_error_status(db, seed, otel):
    """A stale read adds a span event; a raised StaleReadError sets status ERROR."""
    seed(db)
    engine = db.engine()
    otel.install(engine, on_stale="raise")
    session = Session(engine, expire_on_commit=False)
    user = _stale_workload(db, session)
    with pytest.raises(StaleReadError):
        session.scalars(select(User)).all()
    session.rollback()
    [_, stale_span] = otel.spans()
    assert stale_span.status.status_code is StatusCode.ERROR
    assert stale_span.attributes["sessionguard.stale_reads"] == 1
    [stale_event] = [
        e for e in stale_span.events if e.name == "sessionguard.stale_read"
    ]
    assert stale_event.attributes["sessionguard.entity"] == "User"
    assert tuple(stale_event.attributes["sessionguard.attributes"]) == ("name",)
    assert (
        "sessionguard.identity" not in stale_event.attributes
    )  # not without log_values
    assert stale_event.attributes["code.file.path"] == __file__
    [exception_event] = [e for e in stale_span.events if e.name == "exception"]
    assert exception_event.attributes["exception.type"].endswith("StaleReadError")
    for event in stale_span.events:
        for value in event.attributes.values():
            assert "bob" not in str(value)
            assert "alice" not in str(value)
    session.close()
    del user


def test_a_transactions_stale_reads_are_its_own(sqlite_db, seed, otel):
    """The span of the transaction after a stale read counts none of it."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    otel.install(engine)
    session = Session(engine, expire_on_commit=False)
    user = _stale_workload(sqlite_db, session)
    [read] = session.scalars(select(User)).all()
    assert read.name == "alice"  # the stale value, as without the guard
    session.commit()
    session.scalars(select(Address)).all()  # no identity-map hit
    session.commit()
    assert [span.attributes["sessionguard.stale_reads"] for span in otel.spans()] == [
        0,
        1,
        0,
    ]
    session.close()
    del user


def test_db_namespace_follows_the_session_from_engine_to_engine(tmp_path, otel):
    """A session rebound to another database: each span names its own."""
    engines = [create_engine(f"sqlite:///{tmp_path / name}.db") for name in "ab"]
    guard = otel.install(None)
    try:
        session = Session(engines[0])
        for engine in (*engines, engines[0]):
            session.bind = engine
            session.execute(text("SELECT 1"))
            session.commit()
        session.close()
    finally:
        guard.uninstall()
        for engine in engines:
            engine.dispose()
    assert [span.attributes["db.namespace"] for span in otel.spans()] == [
        str(tmp_path / "a.db"),
        str(tmp_path / "b.db"),
        str(tmp_path / "a.db"),
    ]


def test_identity_in_span_event_only_with_log_values(sqlite_db, seed, otel):
    """The stale-read span event carries the identity only when log_values is on."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    install_guard(engine, log_values=True, tracer_provider=otel.tracer_provider)
    session = Session(engine, expire_on_commit=False)
    user = _stale_workload(sqlite_db, session)
    session.scalars(select(User)).all()
    session.commit()
    [event] = [e for s in otel.spans() for e in s.events]
    assert tuple(event.attributes["sessionguard.identity"]) == ("1",)
    session.close()
    del user


def test_spans_end_when_a_session_is_closed_or_collected(sqlite_db, seed, otel):
    """A transaction ended by close() or by garbage collection leaks no span."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine, tracer_provider=otel.tracer_provider)
    closed = Session(engine)
    closed.get(User, 1)
    closed.close()
    dropped = Session(engine)
    dropped.get(User, 1)
    del dropped
    gc.collect()
    spans = otel.spans()
    assert len(spans) == 2
    assert [s.attributes["sessionguard.outcome"] for s in spans] == ["rollback"] * 2
    assert guard.stats().rollbacks == 2


def test_metrics_for_a_scripted_workload(db, seed, otel):
    """Every metric of the design: name, unit, kind, attributes and exact values."""
    seed(db)
    engine = db.engine()
    install_guard(
        engine,
        expire={"begin"},
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    session = Session(engine, expire_on_commit=False)
    # Transaction 1 (commit): load user 1 and address 1.
    user = session.get(User, 1)
    address = session.get(Address, 1)
    session.commit()
    with db.engine().begin() as connection:
        connection.execute(update(User).values(name="bob"))
    # Transaction 2 (rollback): expire at begin makes the read fresh; then
    # the user is renamed again and read from the map twice: by get() and by
    # the many-to-one of the address. Two stale reads.
    assert session.scalars(select(User)).one().name == "bob"
    with db.engine().begin() as connection:
        connection.execute(update(User).values(name="carol"))
    assert session.get(User, 1).name == "bob"
    assert address.user is user
    assert user.name == "bob"
    session.rollback()
    session.close()

    metrics = otel.metrics()
    system = db.name
    units = {name: metric.unit for name, metric in metrics.items()}
    assert units == {
        "sessionguard.transactions": "{transaction}",
        "sessionguard.transaction.duration": "s",
        "sessionguard.identity_map.size": "{object}",
        "sessionguard.identity_map.hits": "{object}",
        "sessionguard.verifications": "{object}",
        "sessionguard.stale_reads": "{read}",
        "sessionguard.expire_all": "{call}",
        "sessionguard.findings": "{finding}",
        "sessionguard.verification.duration": "s",
    }
    transactions = otel.points("sessionguard.transactions")
    assert {key: point.value for key, point in transactions.items()} == {
        (("db.system.name", system), ("sessionguard.outcome", "commit")): 1,
        (("db.system.name", system), ("sessionguard.outcome", "rollback")): 1,
    }
    durations = otel.points("sessionguard.transaction.duration")
    assert sorted(point.count for point in durations.values()) == [1, 1]
    [size] = otel.points("sessionguard.identity_map.size").items()
    assert size[0] == (("db.system.name", system),)
    assert (size[1].count, size[1].sum, size[1].max) == (2, 4, 2)
    hits = otel.points("sessionguard.identity_map.hits")
    assert {key: p.value for key, p in hits.items()} == {
        (("sessionguard.entity", "User"),): 2
    }
    verifications = otel.points("sessionguard.verifications")
    assert {key: p.value for key, p in verifications.items()} == {
        (("sessionguard.entity", "User"),): 2
    }
    stale = otel.points("sessionguard.stale_reads")
    assert {key: p.value for key, p in stale.items()} == {
        (("db.system.name", system), ("sessionguard.entity", "User")): 2
    }
    expire = otel.points("sessionguard.expire_all")
    assert {key: p.value for key, p in expire.items()} == {
        (("sessionguard.reason", "begin"),): 2
    }
    findings = otel.points("sessionguard.findings")
    assert {key: p.value for key, p in findings.items()} == {
        (("sessionguard.kind", "stale_read"),): 2
    }
    [verification] = otel.points("sessionguard.verification.duration").items()
    assert verification[0] == (("db.system.name", system),)
    assert verification[1].count == 2
    for name in metrics:
        for point in otel.points(name).values():
            for key in dict(point.attributes):
                assert key in {
                    "db.system.name",
                    "sessionguard.outcome",
                    "sessionguard.entity",
                    "sessionguard.reason",
                    "sessionguard.kind",
                }, f"{name} has a high-cardinality attribute {key}"


def test_global_providers_are_looked_up_at_install_time(sqlite_db, seed, monkeypatch):
    """Without explicit providers the guard uses the globals set before install."""
    from opentelemetry import metrics, trace

    otel = Otel()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: otel.tracer_provider)
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: otel.meter_provider)
    seed(sqlite_db)
    engine = sqlite_db.engine()
    install_guard(engine)
    with Session(engine) as session:
        session.get(User, 1)
        session.commit()
    assert len(otel.spans()) == 1
    assert "sessionguard.transactions" in otel.metrics()


class _CountingNonRecordingSpan(NonRecordingSpan):
    attribute_calls = 0

    def set_attributes(self, attributes: Any) -> None:
        type(self).attribute_calls += 1

    def set_attribute(self, key: str, value: Any) -> None:
        type(self).attribute_calls += 1


class _NonRecordingTracer:
    def start_span(self, *args: Any, **kwargs: Any) -> NonRecordingSpan:
        from opentelemetry.trace import INVALID_SPAN_CONTEXT

        return _CountingNonRecordingSpan(INVALID_SPAN_CONTEXT)


class _NonRecordingProvider:
    def get_tracer(self, *args: Any, **kwargs: Any) -> _NonRecordingTracer:
        return _NonRecordingTracer()


def test_no_span_attributes_are_computed_for_a_non_recording_span(sqlite_db, seed):
    """With a non-recording span (no SDK) the guard sets no attributes at all."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    install_guard(engine, tracer_provider=_NonRecordingProvider())
    session = Session(engine, expire_on_commit=False)
    user = _stale_workload(sqlite_db, session)
    session.scalars(select(User)).all()
    session.commit()
    session.close()
    assert _CountingNonRecordingSpan.attribute_calls == 0
    del user


def test_nests_beside_the_sqlalchemy_instrumentation(sqlite_db, seed, otel):
    """With opentelemetry-instrumentation-sqlalchemy, query spans and the transaction span share the request parent."""
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.sqlalchemy")
    seed(sqlite_db)
    engine = sqlite_db.engine()
    instrumentor = instrumentation.SQLAlchemyInstrumentor()
    instrumentor.instrument(
        engine=engine, tracer_provider=otel.tracer_provider, skip_dep_check=True
    )
    try:
        install_guard(engine, tracer_provider=otel.tracer_provider)
        tracer = otel.tracer_provider.get_tracer("test")
        with (
            tracer.start_as_current_span("request") as request_span,
            Session(engine) as session,
        ):
            session.get(User, 1)
            session.scalars(select(Address)).all()
            session.commit()
    finally:
        instrumentor.uninstrument()
    request_id = request_span.get_span_context().span_id
    spans = otel.exporter.get_finished_spans()
    [transaction] = [s for s in spans if s.name == "session transaction"]
    queries = [
        s for s in spans if s.name not in ("session transaction", "request", "connect")
    ]
    assert len(queries) >= 2
    assert transaction.parent.span_id == request_id
    for query in queries:
        assert query.parent.span_id == request_id
        assert query.start_time >= transaction.start_time
        assert query.end_time <= transaction.end_time


def test_uninstall_mid_transaction_ends_the_open_span(sqlite_db, seed, otel):
    """Uninstalling while a transaction is open ends its span and frees the guard."""
    import weakref

    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine, tracer_provider=otel.tracer_provider)
    session = Session(engine)
    session.get(User, 1)
    guard.uninstall()
    assert len(otel.spans()) == 1
    guard_ref = weakref.ref(guard)
    del guard
    gc.collect()
    assert guard_ref() is None  # no finalizer of the open transaction holds it
    session.close()


@pytest.mark.parametrize("spelling", ["mysql", "mariadb"])
def test_mariadb_is_mariadb_however_the_url_spells_it(mysql_url, spelling, seed, otel):
    """A mysql:// URL that reaches MariaDB reports db.system.name 'mariadb' too.

    The MySQL dialect keeps the name ``mysql`` on a MariaDB server; the span
    and the stale-read counter (also for a get() outside any transaction) must
    say what the server is, as the dashboard's db_system variable lists it.
    """
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from .conftest import _mysql, mysql_system
    from .models import Base

    url = make_url(mysql_url).set(drivername=f"{spelling}+pymysql")
    database = _mysql(url.render_as_string(hide_password=False))
    expected = mysql_system(database.url)
    setup = create_engine(database.url)
    Base.metadata.drop_all(setup)
    Base.metadata.create_all(setup)
    try:
        seed(database)
        engine = database.engine()
        assert engine.dialect.name == spelling
        install_guard(
            engine,
            tracer_provider=otel.tracer_provider,
            meter_provider=otel.meter_provider,
        )
        session = Session(engine, expire_on_commit=False)
        user = _stale_workload(database, session)
        assert session.get(User, 1) is user  # outside a transaction: no SQL
        assert user.name == "alice"  # the stale value
        session.close()
        [span] = otel.spans()
        assert span.attributes["db.system.name"] == expected
        stale = otel.points("sessionguard.stale_reads")
        assert list(stale) == [
            (("db.system.name", expected), ("sessionguard.entity", "User"))
        ]
    finally:
        for engine in database.engines:
            engine.dispose()
        Base.metadata.drop_all(setup)
        setup.dispose()


def test_identity_map_size_of_a_session_closed_without_commit(db, otel):
    """50 objects read and closed without commit: 50 in the log, the histogram and the stats."""
    from structlog.testing import capture_logs

    writer = db.engine()
    with Session(writer) as session:
        session.add_all(User(id=n, name=f"user-{n}") for n in range(1, 51))
        session.commit()
    engine = db.engine()
    guard = install_guard(
        engine,
        log_level="debug",
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    with capture_logs() as logs, Session(engine) as session:
        users = session.scalars(select(User)).all()  # a read-only request
        assert len(users) == 50
    # close() emptied the map before the transaction ended
    [ended] = [entry for entry in logs if entry["event"] == "session.rollback"]
    assert ended["identity_map_size"] == 50
    [(_, size)] = otel.points("sessionguard.identity_map.size").items()
    assert (size.count, size.sum, size.max) == (1, 50, 50)
    [span] = otel.spans()
    assert span.attributes["sessionguard.identity_map.size"] == 50
    assert guard.stats().max_identity_map_size == 50
    del users


def test_identity_map_size_is_the_most_held_during_the_transaction(sqlite_db, otel):
    """Objects held across a statement, then dropped before commit, still count at the end."""
    writer = sqlite_db.engine()
    with Session(writer) as session:
        session.add_all(User(id=n, name=f"user-{n}") for n in range(1, 21))
        session.commit()
    engine = sqlite_db.engine()
    guard = install_guard(engine, meter_provider=otel.meter_provider)
    with Session(engine) as session:
        users = session.scalars(select(User)).all()
        assert len(users) == 20
        session.scalars(select(User).where(User.id == 1)).all()
        del users  # the weak map forgets them before the commit
        session.commit()
    [(_, size)] = otel.points("sessionguard.identity_map.size").items()
    assert size.max == 20
    assert guard.stats().max_identity_map_size == 20


def _run_script(tmp_path: Any, name: str, source: str) -> str:
    """Run *source* as a script of its own (global providers are set once)."""
    import subprocess
    import sys

    script = tmp_path / name
    script.write_text(source)
    completed = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


# Installed before any SDK: the API's proxies. What each script below runs first.
_GUARD_BEFORE_ANY_SDK = """
import json

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from sessionguard import install_guard

engine = create_engine("sqlite://")
guard = install_guard(engine)  # no SDK anywhere yet: the API's proxies


def transaction():
    with Session(engine) as session:
        session.execute(text("SELECT 1"))
        session.commit()


def counted(reader):
    # The values of sessionguard.transactions in what reader collects.
    return [
        point.value
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "sessionguard.transactions"
        for point in metric.data.data_points
    ]

"""

_LATE_SDK = (
    _GUARD_BEFORE_ANY_SDK
    + """

transaction()  # nothing can record it
exporter = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
reader = InMemoryMetricReader()
trace.set_tracer_provider(tracer_provider)
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
transaction()
transaction()
print(json.dumps({
    "spans": [span.name for span in exporter.get_finished_spans()],
    "transactions_metric": counted(reader),
    "transactions_stats": guard.stats().transactions,
}))
"""
)


def test_an_sdk_set_globally_after_install_is_used_from_then_on(tmp_path):
    """
    Installed before any SDK, a guard skips telemetry while nothing can record
    it, and traces from the first transaction after an SDK is set globally;
    ``sessionguard.transactions`` reads the sessions' own counts, so it counts
    the transaction before too, as the guard's stats do.
    (A subprocess: the global providers can be set only once.)
    """
    import json

    output = _run_script(tmp_path, "late_sdk.py", _LATE_SDK)
    result = json.loads(output.strip().splitlines()[-1])
    assert result == {
        "spans": ["session transaction", "session transaction"],
        "transactions_metric": [3],
        "transactions_stats": 3,
    }


_ASSIGNED_TRACER_PROVIDER = (
    _GUARD_BEFORE_ANY_SDK
    + """

transaction()
exporter = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
# What a test fixture does (mock.patch.object(trace, "_TRACER_PROVIDER", ...)):
# the API's proxy tracers follow it without set_tracer_provider().
trace._TRACER_PROVIDER = tracer_provider
transaction()
print(json.dumps([span.name for span in exporter.get_finished_spans()]))
"""
)


_OPEN_AT_EXIT = """
import sys

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from sessionguard import install_guard


class Printing(SpanExporter):
    def export(self, spans):
        for span in spans:
            outcome = span.attributes.get("sessionguard.outcome")
            print(f"{span.name}: {outcome}", flush=True)
        return SpanExportResult.SUCCESS


tracer_provider = TracerProvider()  # shuts down at exit
tracer_provider.add_span_processor(SimpleSpanProcessor(Printing()))
engine = create_engine("sqlite://")
guard = install_guard(engine, tracer_provider=tracer_provider)
session = Session(engine)
session.execute(text("SELECT 1"))  # a transaction still open at exit
print("exiting", flush=True)
"""


def test_a_tracer_provider_assigned_to_the_api_after_install_is_used(tmp_path):
    """
    The API's proxy tracers record once ``trace._TRACER_PROVIDER`` is set, also
    when a test assigns it directly: the guard records from the next transaction.
    """
    import json

    output = _run_script(tmp_path, "assigned.py", _ASSIGNED_TRACER_PROVIDER)
    assert json.loads(output.strip().splitlines()[-1]) == ["session transaction"]


def test_a_transaction_open_at_exit_ends_as_a_rollback(tmp_path):
    """A session still alive at interpreter exit has its span ended, as a rollback."""
    output = _run_script(tmp_path, "open_at_exit.py", _OPEN_AT_EXIT)
    assert output.splitlines() == ["exiting", "session transaction: rollback"]


def _transactions_counted(otel: Otel) -> dict[str, int]:
    """sessionguard.transactions by outcome."""
    points = otel.points("sessionguard.transactions")
    return {dict(key)["sessionguard.outcome"]: p.value for key, p in points.items()}


def test_sampled_transactions_are_traced_and_every_one_is_counted(
    sqlite_db, seed, otel
):
    """
    At sample_rate 0.5 about half the transactions get a span and their two
    histograms, the same ones; sessionguard.transactions counts all of them.
    """
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(
        engine,
        sample_rate=0.5,
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    _transactions(engine, 400)
    traced = len(otel.spans())
    # Binomial(400, 0.5): 200 +- 10; these bounds are six deviations wide.
    assert 140 <= traced <= 260
    [duration] = otel.points("sessionguard.transaction.duration").values()
    [size] = otel.points("sessionguard.identity_map.size").values()
    assert duration.count == size.count == traced
    assert _transactions_counted(otel) == {"commit": 400}
    assert guard.stats().transactions == guard.stats().commits == 400


def test_an_unsampled_transaction_gets_its_span_when_something_is_found(
    sqlite_db, seed, otel
):
    """
    sample_rate=0: no transaction is traced, but one in which a stale read is
    found (here by Guard.verify()) gets its span, begun when the transaction
    began, with the stale-read event; its histograms stay unsampled.
    """
    import time

    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(
        engine,
        sample_rate=0.0,
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    session = Session(engine, expire_on_commit=False)
    user = _stale_workload(sqlite_db, session)  # one transaction, nothing found
    assert otel.spans() == []
    before_begin = time.time_ns()
    session.execute(select(User.id)).all()  # begins the second transaction
    assert session.get(User, 1).name == "alice"  # served from the map, stale
    [finding] = guard.verify(session)
    assert finding.entity == "User"
    session.commit()
    [span] = otel.spans()
    assert before_begin <= span.start_time <= span.end_time
    assert span.attributes["sessionguard.outcome"] == "commit"
    assert span.attributes["db.namespace"] == engine.url.database
    assert span.attributes["sessionguard.stale_reads"] == 1
    assert span.attributes["sessionguard.statements"] == 1
    assert [event.name for event in span.events] == ["sessionguard.stale_read"]
    assert "sessionguard.transaction.duration" not in otel.metrics()
    assert _transactions_counted(otel) == {"commit": 2}
    session.close()
    del user


def _two_guards(db: Any, otel: Otel) -> list[tuple[Any, Any]]:
    """Two engines, each with a guard, both on the same SDK providers."""
    guarded = []
    for _ in range(2):
        engine = db.engine()
        guard = install_guard(
            engine,
            tracer_provider=otel.tracer_provider,
            meter_provider=otel.meter_provider,
        )
        guarded.append((engine, guard))
    return guarded


def _transactions(engine: Any, count: int) -> None:
    """*count* transactions of one get() each, in new sessions."""
    for _ in range(count):
        with Session(engine) as session:
            session.get(User, 1)
            session.commit()


def test_the_transaction_counter_is_one_for_every_guard_and_never_goes_back(
    sqlite_db, seed, otel
):
    """
    Two guards on one meter provider share one sessionguard.transactions (an
    SDK keeps the callbacks of the first instrument of a name only): both
    guards' transactions are counted, and neither uninstall() nor clear()
    takes a count back.
    """
    seed(sqlite_db)
    (first_engine, first), (second_engine, second) = _two_guards(sqlite_db, otel)
    _transactions(first_engine, 3)
    _transactions(second_engine, 2)
    assert _transactions_counted(otel) == {"commit": 5}
    first.uninstall()
    _transactions(first_engine, 1)  # not guarded any more
    _transactions(second_engine, 1)
    assert _transactions_counted(otel) == {"commit": 6}
    second.clear()
    assert second.stats().transactions == 0
    _transactions(second_engine, 1)
    assert second.stats().transactions == second.stats().commits == 1
    assert _transactions_counted(otel) == {"commit": 7}
    [transactions_metric] = [
        metric
        for metric in otel.metrics().values()
        if metric.name == "sessionguard.transactions"
    ]
    assert transactions_metric.data.is_monotonic


_PROXY_THEN_REAL = (
    _GUARD_BEFORE_ANY_SDK
    + """

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
other_engine = create_engine("sqlite://")
other = install_guard(other_engine)  # the global provider, the real one now
transaction()
with Session(other_engine) as session:
    session.execute(text("SELECT 1"))
    session.commit()
print(json.dumps({"counted": counted(reader)}))
"""
)


def test_guards_before_and_after_a_global_sdk_share_the_transaction_counter(
    tmp_path,
):
    """
    A guard installed before the SDK made its counter on the API's proxy; one
    installed after, on the real provider the proxy now hands to, shares it
    instead of making a second instrument of the name (whose callbacks the SDK
    would drop). (A subprocess: the global providers can be set only once.)
    """
    import json

    output = _run_script(tmp_path, "proxy_then_real.py", _PROXY_THEN_REAL)
    assert json.loads(output.strip().splitlines()[-1]) == {"counted": [2]}


def test_an_uninstall_while_the_transaction_counter_is_read_waits_for_it(
    sqlite_db, seed, otel
):
    """
    A guard uninstalled inside the collection of sessionguard.transactions on
    the same thread (the garbage collector finalising its engine there) does
    not deadlock the reader, and its counts are neither lost nor doubled.
    """
    import threading

    seed(sqlite_db)
    (first_engine, first), (second_engine, second) = _two_guards(sqlite_db, otel)
    _transactions(first_engine, 2)
    _transactions(second_engine, 3)
    source = first._telemetry.transaction_counts
    assert source is not None

    def uninstalling_source() -> dict[str, list[int]]:
        second.uninstall()  # inside the reader's callback, on its thread
        return source()

    first._telemetry.transaction_counts = uninstalling_source
    read: list[dict[str, int]] = []
    reader = threading.Thread(
        target=lambda: read.append(_transactions_counted(otel)), daemon=True
    )
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "collecting sessionguard.transactions deadlocked"
    first._telemetry.transaction_counts = source
    assert read == [{"commit": 5}]
    assert _transactions_counted(otel) == {"commit": 5}
