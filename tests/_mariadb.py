"""Throwaway MariaDB servers for tests (stdlib and PyMySQL only).

Usage::

    with throwaway_mariadb() as url:
        engine = sqlalchemy.create_engine(url)
        ...

The server lives in a fresh temporary directory (``mariadb-install-db`` into
it), listens only on 127.0.0.1 on a free port (plus a Unix socket inside the
temp dir), runs with durability switched off for speed, and is stopped and
deleted when the context exits. It mirrors tests/_postgres.py: the system
service of the ``mariadb-server`` package is never used, started or enabled.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ._servers import private_database, private_workdir

__all__ = [
    "DATABASE_NAME",
    "MariaDBUnavailable",
    "find_mariadb",
    "private_database",
    "throwaway_mariadb",
]

DATABASE_NAME = "sessionguard_test"
_OS_USER_WHEN_ROOT = "mysql"  # mariadbd refuses to run as root
_START_ATTEMPTS = 3
_CMD_TIMEOUT = 120.0
_READY_TIMEOUT = 60.0
_LOG_TAIL_LINES = 40


class MariaDBUnavailable(RuntimeError):
    """No usable MariaDB installation, or the throwaway server failed to start."""


def _which(name: str) -> Path | None:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def find_mariadb() -> tuple[Path, Path] | None:
    """The ``mariadbd`` and ``mariadb-install-db`` executables, or None."""
    server = _which("mariadbd") or _which("mysqld")
    install_db = _which("mariadb-install-db") or _which("mysql_install_db")
    if server is None or install_db is None:
        return None
    return server, install_db


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(logfile: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = logfile.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {logfile}: {exc}>"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "<empty log>"


def _make_workdir() -> tuple[Path, list[str]]:
    """A private temp dir the server can own, and its --user argument."""
    if os.geteuid() == 0 and not _has_os_user(_OS_USER_WHEN_ROOT):
        # mariadb-server-core (what scripts/ensure-mariadb installs) makes no
        # mysql user: the server package's postinst does. mariadbd runs as
        # root when it is told so explicitly, in a directory only root reads.
        path = Path(tempfile.mkdtemp(prefix="sg-maria-", dir="/tmp"))
        os.chmod(path, 0o700)
        return path, ["--user=root"]
    path, as_user = private_workdir(
        "sg-maria-", _OS_USER_WHEN_ROOT, MariaDBUnavailable, "mariadbd"
    )
    return path, [f"--user={_OS_USER_WHEN_ROOT}"] if as_user else []


def _has_os_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _install_db(
    install_db: Path, workdir: Path, datadir: Path, user: list[str]
) -> None:
    log = workdir / "install-db.out"
    with open(log, "w", encoding="utf-8", errors="replace") as out:
        proc = subprocess.run(
            [
                str(install_db),
                "--no-defaults",
                f"--datadir={datadir}",
                f"--tmpdir={workdir / 'tmp'}",
                *user,
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=_CMD_TIMEOUT,
            check=False,
        )
    if proc.returncode != 0:
        raise MariaDBUnavailable(
            f"mariadb-install-db failed ({proc.returncode}):\n{_log_tail(log)}"
        )


def _connect(sock: Path, database: str | None = None) -> object:
    import pymysql

    return pymysql.connect(
        unix_socket=str(sock), user="root", database=database, connect_timeout=2
    )


def _wait_ready(process: subprocess.Popen[bytes], sock: Path, logfile: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MariaDBUnavailable(
                f"mariadbd exited {process.returncode} while starting:\n"
                f"{_log_tail(logfile)}"
            )
        if sock.exists():
            try:
                connection = _connect(sock)
            except Exception as error:  # noqa: BLE001 - any failure means "not yet"
                last = error
            else:
                connection.close()  # type: ignore[attr-defined]
                return
        time.sleep(0.2)
    raise MariaDBUnavailable(
        f"mariadbd did not accept connections within {_READY_TIMEOUT:.0f}s "
        f"({last}):\n{_log_tail(logfile)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # mariadbd shuts down cleanly on TERM
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _start(
    server: Path, workdir: Path, datadir: Path, user: list[str]
) -> tuple[subprocess.Popen[bytes], int]:
    sock = workdir / "mysqld.sock"
    logfile = workdir / "server.log"
    last_error = ""
    for _ in range(_START_ATTEMPTS):
        port = _free_port()
        args = [
            str(server),
            "--no-defaults",
            f"--datadir={datadir}",
            f"--tmpdir={workdir / 'tmp'}",
            f"--socket={sock}",
            f"--pid-file={workdir / 'mysqld.pid'}",
            f"--log-error={logfile}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=16M",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            *user,
        ]
        # Never inherited pipes: the server must not keep the test's open.
        process = subprocess.Popen(
            args,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _wait_ready(process, sock, logfile)
        except MariaDBUnavailable as error:
            _stop(process)
            last_error = str(error)
            if "already in use" not in last_error and "Address in use" not in (
                last_error
            ):
                break  # not a port race: retrying will not help
            continue
        return process, port
    raise MariaDBUnavailable("MariaDB server failed to start: " + last_error)


def _create_database(workdir: Path) -> None:
    connection: object = _connect(workdir / "mysqld.sock")
    try:
        cursor = connection.cursor()  # type: ignore[attr-defined]
        cursor.execute(f"CREATE DATABASE {DATABASE_NAME}")
        # --skip-name-resolve: TCP from 127.0.0.1 is not 'localhost'.
        cursor.execute("CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'")
        cursor.execute("GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION")
    finally:
        connection.close()  # type: ignore[attr-defined]


@contextlib.contextmanager
def throwaway_mariadb() -> Iterator[str]:
    """Start a private MariaDB server; yield a SQLAlchemy URL to it.

    The URL is ``mariadb+pymysql://root@127.0.0.1:PORT/sessionguard_test``.
    The server is stopped and its directory removed on exit, even on error.
    Raises :class:`MariaDBUnavailable` (a ``RuntimeError``) if no installation
    is found or the server cannot be started.
    """
    found = find_mariadb()
    if found is None:
        raise MariaDBUnavailable(
            "no mariadbd and mariadb-install-db found (looked on PATH, /usr/sbin, "
            "/usr/bin); install them e.g. with `apt-get install mariadb-server` "
            "or run scripts/ensure-mariadb"
        )
    server, install_db = found
    workdir, user = _make_workdir()
    datadir = workdir / "data"
    # Temporary tables in a directory of this server's own, not the shared
    # /tmp (mariadb-install-db failed there now and then: "Error on delete of
    # '/tmp/#sql-temptable-...'").
    (workdir / "tmp").mkdir()
    if user and user != ["--user=root"]:
        shutil.chown(workdir / "tmp", _OS_USER_WHEN_ROOT, _OS_USER_WHEN_ROOT)
    try:
        _install_db(install_db, workdir, datadir, user)
        process, port = _start(server, workdir, datadir, user)
        try:
            _create_database(workdir)
            yield f"mariadb+pymysql://root@127.0.0.1:{port}/{DATABASE_NAME}"
        finally:
            _stop(process)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
