"""What the throwaway PostgreSQL and MariaDB harnesses share."""

from __future__ import annotations

import os
import pwd
import tempfile
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
