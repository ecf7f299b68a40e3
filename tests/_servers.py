"""What the throwaway PostgreSQL and MariaDB harnesses share."""

from __future__ import annotations

import contextlib
import os
import pwd
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def private_workdir(
    prefix: str, os_user: str, unavailable: type[Exception], server: str
) -> tuple[Path, bool]:
    """
    A private temporary directory the server can own; whether it runs as *os_user*.

    As root the directory is made under /tmp (world-traversable; $TMPDIR, e.g.
    under /root, may not be) and given to *os_user*, since *server* refuses to
    run as root; *unavailable* is raised when there is no such user.
    """
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(os_user)
        except KeyError:
            raise unavailable(
                f"running as root but there is no {os_user!r} OS user "
                f"to run the server as ({server} refuses to run as root)"
            ) from None
        path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        os.chown(path, pw.pw_uid, pw.pw_gid)
        as_user = True
    else:
        path = Path(tempfile.mkdtemp(prefix=prefix))
        as_user = False
    os.chmod(path, 0o700)
    return path, as_user


@contextlib.contextmanager
def private_database(url: str) -> Iterator[str]:
    """A database of this test run's own on the server at *url*, dropped at the end.

    A shared server (CI's, or the developer's) may hold other tables of the same
    names, or serve another test run, or another xdist worker of this one, at
    the same time. Without the privilege to create a database, the database
    named in *url* is used as it is. MariaDB/MySQL and PostgreSQL (where the
    statements run outside a transaction, on psycopg, and the drop ends the
    connections a test left behind).
    """
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    parsed = make_url(url)
    name = f"sessionguard_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    if parsed.get_backend_name() == "postgresql":
        admin = create_engine(
            parsed.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
        )
        drop = f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    else:
        admin = create_engine(parsed)
        drop = f"DROP DATABASE IF EXISTS {name}"
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    except DBAPIError:
        admin.dispose()
        yield url
        return
    try:
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(drop)
        admin.dispose()
