"""Prove that tests/_postgres.py really starts, serves and tears down clusters."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ._postgres import (
    DATABASE_NAME,
    PostgresUnavailable,
    find_pg_bindir,
    throwaway_postgres,
)
from ._servers import private_database

pytestmark = pytest.mark.skipif(
    find_pg_bindir() is None and os.environ.get("CI", "").lower() != "true",
    reason="no PostgreSQL >= 15 bin dir (run scripts/ensure-postgres)",
)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _server_dir(url: str) -> Path:
    """Find the cluster's temp dir via the server itself (data_directory)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            data_dir = conn.execute(text("show data_directory")).scalar_one()
    finally:
        engine.dispose()
    return Path(data_dir).parent


def _version(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("select version()")).scalar_one())
    finally:
        engine.dispose()


def test_find_pg_bindir() -> None:
    bindir = find_pg_bindir()
    assert bindir is not None
    assert (bindir / "initdb").exists() and (bindir / "pg_ctl").exists()


def test_start_query_and_teardown() -> None:
    t0 = time.monotonic()
    with throwaway_postgres() as url:
        started = time.monotonic() - t0
        parsed = make_url(url)
        assert parsed.drivername == "postgresql+psycopg"
        assert parsed.host == "127.0.0.1"
        assert parsed.username == "postgres"
        assert parsed.database == DATABASE_NAME
        assert parsed.port is not None and parsed.port != 5432
        port = parsed.port

        assert "PostgreSQL" in _version(url)
        workdir = _server_dir(url)
        assert workdir.is_dir()
        assert _port_open(port)
    elapsed = time.monotonic() - t0
    print(f"\ncluster start: {started:.2f}s, start+stop total: {elapsed:.2f}s")

    assert not _port_open(port), "server still accepting connections after exit"
    assert not workdir.exists(), f"temp dir {workdir} not removed"


def test_teardown_when_body_raises() -> None:
    port: int | None = None
    workdir: Path | None = None

    def crash_inside() -> None:
        nonlocal port, workdir
        with throwaway_postgres() as url:
            port = make_url(url).port
            workdir = _server_dir(url)
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        crash_inside()
    assert port is not None and workdir is not None
    assert not _port_open(port)
    assert not workdir.exists()


def test_two_clusters_at_once() -> None:
    with contextlib.ExitStack() as stack:
        url_a = stack.enter_context(throwaway_postgres())
        url_b = stack.enter_context(throwaway_postgres())
        port_a, port_b = make_url(url_a).port, make_url(url_b).port
        assert port_a != port_b
        assert _server_dir(url_a) != _server_dir(url_b)

        # Each cluster is independent: a table created in A is absent in B.
        eng_a, eng_b = create_engine(url_a), create_engine(url_b)
        try:
            with eng_a.begin() as conn:
                conn.execute(text("create table only_in_a (x int)"))
            with eng_b.connect() as conn:
                found = conn.execute(
                    text("select to_regclass('only_in_a') is not null")
                ).scalar_one()
                assert found is False
            assert "PostgreSQL" in _version(url_a) and "PostgreSQL" in _version(url_b)
        finally:
            eng_a.dispose()
            eng_b.dispose()
    assert port_a is not None and port_b is not None
    assert not _port_open(port_a) and not _port_open(port_b)


def test_unavailable_is_runtime_error() -> None:
    assert issubclass(PostgresUnavailable, RuntimeError)


def test_start_failure_reports_log_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    from . import _postgres

    # Make the server fail to start by passing an invalid setting.
    real_run = _postgres._Runner.run

    def bad_run(self, tool, args, *, as_server_user=True):  # type: ignore[no-untyped-def]
        if tool == "pg_ctl" and args and args[0] == "start":
            args = [*args[:-1], args[-1] + " -c shared_buffers=bogus"]
        return real_run(self, tool, args, as_server_user=as_server_user)

    monkeypatch.setattr(_postgres._Runner, "run", bad_run)
    with pytest.raises(PostgresUnavailable) as excinfo, throwaway_postgres():
        pass
    msg = str(excinfo.value)
    assert "failed to start" in msg
    assert "shared_buffers" in msg  # comes from the server log tail


def test_private_database_is_made_and_dropped(pg_url: str) -> None:
    """On a shared server each test run (and xdist worker) has a database of its own."""
    url = make_url(pg_url).set(drivername="postgresql+psycopg")
    with private_database(url.render_as_string(hide_password=False)) as private:
        name = make_url(private).database
        assert name != url.database
        engine = create_engine(private)
        try:
            with engine.connect() as connection:
                assert connection.scalar(text("select current_database()")) == name
        finally:
            engine.dispose()
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            exists = connection.scalar(
                text("select count(*) from pg_database where datname = :name"),
                {"name": name},
            )
    finally:
        engine.dispose()
    assert exists == 0
