"""The shipped Grafana dashboard queries only metrics the guard really exports."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry

from sessionguard import install_guard

from ._dashboard import (
    DASHBOARD_PATH,
    Workload,
    exposed_names,
    expressions,
    load_dashboard,
    metric_names,
    panels,
    substitute,
)

# Every family the guard exports, as opentelemetry-exporter-prometheus names it.
FAMILIES = 9


@pytest.fixture
def emitted(sqlite_db, seed) -> Iterator[set[str]]:
    """The Prometheus sample names a guarded workload exposes, scraped for real."""
    seed(sqlite_db)
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    engine = sqlite_db.engine()
    guard = install_guard(engine, meter_provider=provider, expire={"request"})
    workload = Workload(engine, sqlite_db.engine())
    for stale_reads in (1, 1):
        workload.phase(stale_reads)
    workload.close()
    assert guard.stats().stale_reads == 2
    yield {name for name in exposed_names(registry) if name.startswith("sessionguard_")}
    provider.shutdown()


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable():
    """The JSON is a schemaVersion 39 dashboard whose panels use ${DS_PROMETHEUS}."""
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "sessionguard"
    [datasource] = [
        variable
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "datasource"
    ]
    assert (datasource["name"], datasource["query"]) == ("DS_PROMETHEUS", "prometheus")
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_every_panel_has_a_promql_target():
    """Each data panel has at least one target, and each target a PromQL expr."""
    dashboard = load_dashboard()
    assert len(panels(dashboard)) >= 8
    for panel in panels(dashboard):
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), (panel["title"], target["refId"])
            assert metric_names(target["expr"]), (panel["title"], target["expr"])


def test_every_variable_in_the_promql_is_defined():
    """Substituting Grafana's built-ins and the dashboard's variables leaves no $."""
    dashboard = load_dashboard()
    for where, expr in expressions(dashboard):
        assert "$" not in substitute(expr, dashboard), where


def test_every_referenced_metric_is_emitted_by_the_guard(emitted):
    """Every metric name in the dashboard's PromQL is one a guard's scrape exposes."""
    dashboard = load_dashboard()
    referenced = {
        (where, name)
        for where, expr in expressions(dashboard)
        for name in metric_names(expr)
    }
    unknown = sorted((where, name) for where, name in referenced if name not in emitted)
    assert not unknown, (
        f"not exported by sessionguard: {unknown}; exported: {sorted(emitted)}"
    )


def test_every_metric_the_guard_emits_is_on_the_dashboard(emitted):
    """Each of the guard's metric families is shown by at least one panel."""
    dashboard = load_dashboard()
    referenced = {
        name for _, expr in expressions(dashboard) for name in metric_names(expr)
    }

    def family(name: str) -> str:
        for suffix in ("_bucket", "_count", "_sum"):
            if (
                name.endswith(suffix)
                and name.removesuffix(suffix) + "_bucket" in emitted
            ):
                return name.removesuffix(suffix)
        return name

    families = {family(name) for name in emitted}
    assert len(families) == FAMILIES, sorted(families)
    assert families <= {family(name) for name in referenced}, sorted(
        families - {family(name) for name in referenced}
    )


def test_dashboards_page_shows_every_query_of_the_dashboard():
    """docs/dashboards.md quotes each panel's PromQL exactly as the JSON has it."""
    dashboard = load_dashboard()
    page = (DASHBOARD_PATH.parent.parent / "dashboards.md").read_text(encoding="utf-8")
    missing = [where for where, expr in expressions(dashboard) if expr not in page]
    assert not missing, f"PromQL not quoted in docs/dashboards.md: {missing}"
    for panel in panels(dashboard):
        assert f"**{panel['title']}**" in page, panel["title"]


def test_db_system_variable_lists_mariadb_and_sqlite_apart(db, seed):
    """The db_system variable's label carries what the server is, per backend.

    A workload on each test database (MariaDB reached through the URL spelling
    its environment gives, mysql:// in CI) exposes db_system_name values that the
    variable's label_values() query lists and its filter selects one by one.
    """
    seed(db)
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    engine = db.engine()
    install_guard(engine, meter_provider=provider, expire={"request"})
    workload = Workload(engine, db.engine())
    workload.phase(stale_reads=1)
    workload.close()
    [variable] = [
        v for v in load_dashboard()["templating"]["list"] if v["name"] == "db_system"
    ]
    metric, label = re.fullmatch(
        r'label_values\((\w+)\{job=~"\$job"\}, (\w+)\)', variable["definition"]
    ).groups()
    values = {
        sample.labels[label]
        for family in registry.collect()
        for sample in family.samples
        if sample.name == metric
    }
    expected = db.name  # for MariaDB: what the server says it is
    assert values == {expected}
    stale = {
        sample.labels.get(label)
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "sessionguard_stale_reads_total"
    }
    assert stale == {expected}
    provider.shutdown()
