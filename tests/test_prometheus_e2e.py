"""End to end: a real Prometheus scrapes a guarded app; every dashboard query has data.

The Prometheus server comes from scripts/ensure-prometheus (the binary of the
Debian package `prometheus`, extracted into the venv), or SESSIONGUARD_PROMETHEUS. It runs on a free loopback port of
its own, never the distro daemon's :9090, and is stopped at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, start_http_server

from sessionguard import install_guard

from ._dashboard import Workload, expressions, load_dashboard, substitute
from .conftest import _unavailable

DEADLINE_S = 60.0
POLL_S = 0.5
STALE_READ_QUERY = "sum by (sessionguard_entity) (rate(sessionguard_stale_reads_total"


def _prometheus_binary() -> str | None:
    for candidate in (
        os.environ.get("SESSIONGUARD_PROMETHEUS"),
        os.path.join(sys.prefix, "bin", "prometheus"),  # scripts/ensure-prometheus
        "/usr/bin/prometheus",
        shutil.which("prometheus"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    """A Prometheus process of the test's own, and its HTTP API."""

    def __init__(self, binary: str, workdir: Any, target_port: int) -> None:
        self.port = _free_port()
        self.log_path = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: sessionguard\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n",
            encoding="utf-8",
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read()) if path.startswith("/api/") else None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of ``promql`` evaluated now."""
        body = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert body["status"] == "success", (promql, body)
        assert body["data"]["resultType"] == "vector", (promql, body)
        return body["data"]["result"]  # type: ignore[no-any-return]

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        """Poll ``check`` every 0.5 s for up to 60 s; fail naming ``what``."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(
                    f"prometheus exited ({self.process.returncode}):\n{self.log_tail()}"
                )
            try:
                if check():
                    return
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out waiting for {what}; prometheus log:\n{self.log_tail()}"
                )
            time.sleep(POLL_S)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(sample["value"][1]) for sample in result]


def _stale_reads_of_user(prometheus: PrometheusServer) -> float | None:
    result = prometheus.query(
        'sessionguard_stale_reads_total{job="sessionguard", sessionguard_entity="User"}'
    )
    return _values(result)[0] if result else None


@pytest.fixture
def metrics_endpoint() -> Iterator[tuple[MeterProvider, int]]:
    """A MeterProvider whose PrometheusMetricReader is served on a loopback port."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    yield provider, server.server_port
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
    provider.shutdown()


@pytest.fixture
def prometheus(tmp_path, metrics_endpoint) -> Iterator[PrometheusServer]:
    """A real Prometheus scraping the metrics endpoint every second."""
    binary = _prometheus_binary()
    if binary is None:
        _unavailable(
            "the prometheus server binary is missing (run scripts/ensure-prometheus, "
            "or set SESSIONGUARD_PROMETHEUS)"
        )
    assert binary is not None
    server = PrometheusServer(binary, tmp_path, metrics_endpoint[1])
    try:
        server.wait_for(
            "prometheus to be ready", lambda: server.get("/-/ready") is None
        )
        server.wait_for(
            "the first scrape of the metrics endpoint",
            lambda: _values(server.query('up{job="sessionguard"}')) == [1.0],
        )
        yield server
    finally:
        server.stop()


def test_every_dashboard_query_has_data_in_a_real_prometheus(
    sqlite_db, seed, metrics_endpoint, prometheus
):
    """3 stale reads of User reach Prometheus exactly; every dashboard query has data."""
    provider, _ = metrics_endpoint
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine, meter_provider=provider, expire={"request"})
    workload = Workload(engine, sqlite_db.engine())
    # One stale read per phase, each scraped before the next: a counter's first
    # sample is where rate() starts, so the increments must come after it.
    for phase in (1, 2, 3):
        workload.phase(stale_reads=1)
        prometheus.wait_for(
            f"{phase} stale read(s) in prometheus",
            lambda phase=phase: _stale_reads_of_user(prometheus) == phase,
        )
    workload.close()
    stats = guard.stats()
    assert (stats.stale_reads, stats.commits, stats.rollbacks) == (3, 3, 3)
    assert stats.expire_all_calls == 2

    assert _stale_reads_of_user(prometheus) == 3.0
    assert _values(prometheus.query("sum(sessionguard_stale_reads_total)")) == [3.0]

    dashboard = load_dashboard()
    results = {}
    for where, expr in expressions(dashboard):
        promql = substitute(expr, dashboard)
        prometheus.wait_for(
            f"data for {where}: {promql}",
            lambda promql=promql: bool(prometheus.query(promql)),
        )
        result = prometheus.query(promql)
        assert any(math.isfinite(value) for value in _values(result)), (where, result)
        results[where] = (promql, result)

    [stale_rate] = [
        result
        for promql, result in results.values()
        if promql.startswith(STALE_READ_QUERY)
    ]
    assert [sample["metric"] for sample in stale_rate] == [
        {"sessionguard_entity": "User"}
    ]
    assert _values(stale_rate)[0] > 0

    # Shown with -s (or -rP): the query results of this run.
    print("\nPromQL results from a real Prometheus (3 stale reads of User):")
    for where, (promql, result) in results.items():
        shown = {
            json.dumps(sample["metric"], sort_keys=True): sample["value"][1]
            for sample in result
        }
        print(f"  {where}\n    {promql}\n    -> {shown}")
