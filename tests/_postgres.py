"""Throwaway PostgreSQL clusters for tests (stdlib only).

Usage::

    with throwaway_postgres() as url:
        engine = sqlalchemy.create_engine(url)
        ...

The cluster lives in a fresh temporary directory, listens only on 127.0.0.1
on a free port (plus a Unix socket inside the temp dir), runs with durability
switched off for speed, and is stopped and deleted when the context exits.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ._servers import private_workdir

__all__ = [
    "DATABASE_NAME",
    "MIN_MAJOR_VERSION",
    "PostgresUnavailable",
    "find_pg_bindir",
    "throwaway_postgres",
]

MIN_MAJOR_VERSION = 15
DATABASE_NAME = "sessionguard_test"
SUPERUSER = "postgres"
_OS_USER_WHEN_ROOT = "postgres"
_START_ATTEMPTS = 3
_CMD_TIMEOUT = 120.0
_LOG_TAIL_LINES = 40


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL installation, or the throwaway server failed to start."""


# --------------------------------------------------------------------------- #
# Locating binaries
# --------------------------------------------------------------------------- #


def _major_version(bindir: Path) -> int | None:
    """Return the major version of the ``pg_ctl`` in *bindir*, or None."""
    try:
        out = subprocess.run(
            [str(bindir / "pg_ctl"), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out) or re.search(r"(\d+)", out)
    return int(match.group(1)) if match else None


def _usable(bindir: Path) -> bool:
    if not all(os.access(bindir / exe, os.X_OK) for exe in ("initdb", "pg_ctl")):
        return False
    major = _major_version(bindir)
    return major is not None and major >= MIN_MAJOR_VERSION


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin -> numeric sort on <version>
    parts = re.findall(r"\d+", path.parent.name)
    return tuple(int(p) for p in parts) if parts else (-1,)


def _candidate_bindirs() -> Iterator[Path]:
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            yield Path(out)
    debian = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.is_dir()),
        key=_version_key,
        reverse=True,
    )
    yield from debian
    initdb = shutil.which("initdb")
    if initdb is not None:
        yield Path(initdb).resolve().parent


def find_pg_bindir() -> Path | None:
    """Locate a PostgreSQL >= 15 bin dir containing ``initdb`` and ``pg_ctl``.

    Search order: ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``
    (highest version first), then ``initdb`` on ``PATH``.
    """
    seen: set[Path] = set()
    for candidate in _candidate_bindirs():
        if candidate in seen:
            continue
        seen.add(candidate)
        if _usable(candidate):
            return candidate
    return None


# --------------------------------------------------------------------------- #
# Running the server
# --------------------------------------------------------------------------- #


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    # Stray PGHOST/PGPORT/PGDATA/PGSERVICE/... must not redirect our tools
    # (e.g. to the system cluster on 5432).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C.UTF-8"
    env.pop("LANG", None)
    return env


def _log_tail(logfile: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = logfile.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {logfile}: {exc}>"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "<empty log>"


class _Runner:
    """Runs server-side tools, dropping to the postgres OS user when root."""

    def __init__(self, bindir: Path, workdir: Path) -> None:
        self.bindir = bindir
        self.workdir = workdir
        self.env = _clean_env()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            if not os.access(runuser, os.X_OK):
                raise PostgresUnavailable(
                    "running as root but `runuser` is not available to drop to "
                    f"the {_OS_USER_WHEN_ROOT!r} user (initdb refuses to run as root)"
                )
            self.prefix = [runuser, "-u", _OS_USER_WHEN_ROOT, "--"]

    def run(
        self, tool: str, args: Sequence[str], *, as_server_user: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / tool), *args]
        if as_server_user:
            cmd = [*self.prefix, *cmd]
        # cwd: the postgres user may be unable to enter the caller's cwd
        # (e.g. /root). stdin/out/err never left as inherited pipes: pg_ctl
        # forks the postmaster, which must not keep our pipes open.
        log = self.workdir / f".{tool}.out"
        with open(log, "w+", encoding="utf-8", errors="replace") as out:
            proc = subprocess.run(
                cmd,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=_CMD_TIMEOUT,
                check=False,
            )
            out.seek(0)
            output = out.read()
        return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def _make_workdir() -> Path:
    path, _ = private_workdir(
        "sg-pg-", _OS_USER_WHEN_ROOT, PostgresUnavailable, "initdb"
    )
    return path


def _initdb(runner: _Runner, datadir: Path) -> None:
    base = [
        "-D",
        str(datadir),
        "-U",
        SUPERUSER,
        "-A",
        "trust",
        "--no-sync",
        "-E",
        "UTF8",
    ]
    errors: list[str] = []
    for locale_args in (["--locale=C.UTF-8"], ["--no-locale"]):
        proc = runner.run("initdb", [*base, *locale_args])
        if proc.returncode == 0:
            return
        errors.append(proc.stdout.strip())
        shutil.rmtree(datadir, ignore_errors=True)
    raise PostgresUnavailable("initdb failed:\n" + "\n---\n".join(errors))


def _start(runner: _Runner, datadir: Path, sockdir: Path, logfile: Path) -> int:
    last_error = ""
    for _ in range(_START_ATTEMPTS):
        port = _free_port()
        opts = (
            f"-p {port} -k {sockdir} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        proc = runner.run(
            "pg_ctl",
            [
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(datadir),
                "-l",
                str(logfile),
                "-o",
                opts,
            ],
        )
        if proc.returncode == 0:
            return port
        last_error = (
            f"pg_ctl start exited {proc.returncode}:\n{proc.stdout.strip()}\n"
            f"--- tail of {logfile} ---\n{_log_tail(logfile)}"
        )
        _stop(runner, datadir)  # in case it half-started
        if "already in use" not in _log_tail(logfile):
            break  # not a port race: retrying will not help
    raise PostgresUnavailable("PostgreSQL server failed to start: " + last_error)


def _stop(runner: _Runner, datadir: Path) -> None:
    pidfile = datadir / "postmaster.pid"
    if not pidfile.exists():
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = runner.run(
            "pg_ctl", ["stop", "-w", "-t", "30", "-m", "fast", "-D", str(datadir)]
        )
        if proc.returncode == 0:
            return
    # Last resort: kill the postmaster directly so nothing outlives the test.
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pidfile.read_text().splitlines()[0])
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # raises ProcessLookupError once gone
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def _createdb(runner: _Runner, port: int, logfile: Path) -> None:
    args = ["-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER, DATABASE_NAME]
    proc = runner.run("createdb", args, as_server_user=False)
    if proc.returncode != 0:
        raise PostgresUnavailable(
            f"createdb failed ({proc.returncode}):\n{proc.stdout.strip()}\n"
            f"--- tail of {logfile} ---\n{_log_tail(logfile)}"
        )


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a private PostgreSQL cluster; yield a SQLAlchemy URL to it.

    The URL is ``postgresql+psycopg://postgres@127.0.0.1:PORT/sessionguard_test``.
    The server is stopped and its directory removed on exit, even on error.
    Raises :class:`PostgresUnavailable` (a ``RuntimeError``) if no suitable
    installation is found or the server cannot be started.
    """
    bindir = find_pg_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            f"no PostgreSQL >= {MIN_MAJOR_VERSION} bin dir with initdb and pg_ctl found "
            "(looked at `pg_config --bindir`, /usr/lib/postgresql/*/bin, PATH); "
            "install it e.g. with `apt-get install postgresql` or run scripts/ensure-postgres"
        )
    workdir = _make_workdir()
    datadir = workdir / "data"
    sockdir = workdir  # short path: Unix socket paths are limited to ~107 bytes
    logfile = workdir / "server.log"
    try:
        runner = _Runner(bindir, workdir)
        _initdb(runner, datadir)
        try:
            port = _start(runner, datadir, sockdir, logfile)
            _createdb(runner, port, logfile)
            yield f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/{DATABASE_NAME}"
        finally:
            _stop(runner, datadir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
