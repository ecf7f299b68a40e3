"""Prove that tests/_mariadb.py really starts, serves and tears down servers."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ._mariadb import (
    DATABASE_NAME,
    MariaDBUnavailable,
    find_mariadb,
    private_database,
    throwaway_mariadb,
)

pytestmark = pytest.mark.skipif(
    find_mariadb() is None and os.environ.get("CI", "").lower() != "true",
    reason="no mariadbd / mariadb-install-db (run scripts/ensure-mariadb)",
)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _query(url: str, sql: str) -> object:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(sql)).scalar_one()
    finally:
        engine.dispose()


def test_start_query_and_teardown() -> None:
    """A private server on a free loopback port, gone with its directory at exit."""
    with throwaway_mariadb() as url:
        parsed = make_url(url)
        assert parsed.drivername == "mariadb+pymysql"
        assert parsed.host == "127.0.0.1"
        assert parsed.database == DATABASE_NAME
        assert parsed.port is not None and parsed.port != 3306
        port = parsed.port
        assert "MariaDB" in str(_query(url, "select version()"))
        datadir = Path(str(_query(url, "select @@datadir")))
        assert datadir.is_dir()
        assert _port_open(port)
    assert not _port_open(port), "server still accepting connections after exit"
    assert not datadir.parent.exists(), f"temp dir {datadir.parent} not removed"


def test_teardown_when_body_raises() -> None:
    """An error inside the block still stops the server."""
    port: int | None = None

    def crash_inside() -> None:
        nonlocal port
        with throwaway_mariadb() as url:
            port = make_url(url).port
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        crash_inside()
    assert port is not None and not _port_open(port)


def test_private_database_is_made_and_dropped(mysql_url: str) -> None:
    """On a shared server the suite works in a database of its own, dropped after."""
    with private_database(mysql_url) as url:
        name = make_url(url).database
        assert name != make_url(mysql_url).database
        assert _query(url, "select database()") == name
    count = _query(
        mysql_url,
        f"select count(*) from information_schema.schemata where schema_name = '{name}'",
    )
    assert count == 0


def test_unavailable_is_runtime_error() -> None:
    assert issubclass(MariaDBUnavailable, RuntimeError)
