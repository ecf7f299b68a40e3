"""
Where a finding happened: the first frame of the user's own code.

A read made through a wrapper library (SQLModel's ``Session.exec()``,
Flask-SQLAlchemy's ``get_or_404()``) passes through installed third-party
code before it reaches SQLAlchemy; reporting that frame would point every
finding at the same line of someone else's package. So the walk skips
SQLAlchemy, sessionguard's private modules, the standard library and
everything installed (site-packages, dist-packages, the interpreter's
``purelib`` / ``platlib``), and falls back to the first frame outside
SQLAlchemy and sessionguard only when every frame is third-party (a script
that is itself installed, or sessionguard's own demo when installed).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from typing import TYPE_CHECKING

import sqlalchemy

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType

__all__ = ["caller_frames", "is_user_file", "user_location"]

_SQLALCHEMY_DIR = os.path.dirname(os.path.abspath(sqlalchemy.__file__)) + os.sep
# sessionguard's private modules; the public ones (cli, testing, ...) can be
# where a read happens.
_OWN_PRIVATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_")
# SQLAlchemy also compiles wrappers (deprecation warners, proxies) whose
# pseudo-filename starts with "<sqlalchemy".
_NEVER = (_SQLALCHEMY_DIR, _OWN_PRIVATE, "<sqlalchemy")
# Pseudo-filenames of code the user typed or exec()'d; every other "<...>"
# (frozen modules, generated wrappers) belongs to someone else.
_USER_PSEUDO = ("<string>", "<stdin>", "<console>", "<input>", "<ipython-input")


def _installed_prefixes() -> tuple[str, ...]:
    prefixes = set()
    for name in ("purelib", "platlib", "stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(name)
        if path:
            prefixes.add(os.path.join(os.path.abspath(path), ""))
    # The interpreter's own stdlib when running in a virtual environment.
    for base in {sys.base_prefix, sys.base_exec_prefix}:
        for name in ("stdlib", "platstdlib"):
            path = sysconfig.get_paths(vars={"base": base, "platbase": base}).get(name)
            if path:
                prefixes.add(os.path.join(os.path.abspath(path), ""))
    return tuple(sorted(prefixes))


_INSTALLED = _installed_prefixes()
_INSTALLED_PARTS = (
    f"{os.sep}site-packages{os.sep}",
    f"{os.sep}dist-packages{os.sep}",
)
# Filename -> is it the user's own code? Filenames are few; the walk runs
# only when a finding is made, never per statement.
_user_files: dict[str, bool] = {}


def _is_user_file(filename: str) -> bool:
    if filename.startswith("<"):
        return filename.startswith(_USER_PSEUDO)
    if any(part in filename for part in _INSTALLED_PARTS):
        return False
    return not filename.startswith(_INSTALLED)


def is_user_file(filename: str) -> bool:
    """Whether *filename* is user code: not SQLAlchemy, ours, installed or stdlib."""
    known = _user_files.get(filename)
    if known is None:
        known = not filename.startswith(_NEVER) and _is_user_file(filename)
        if len(_user_files) < 10_000:
            _user_files[filename] = known
    return known


def caller_frames(depth: int = 1) -> Iterator[FrameType]:
    """The caller's frames, then those of each parent greenlet in turn."""
    frame: FrameType | None = sys._getframe(depth + 1)
    # Under asyncio the ORM runs in a greenlet whose own stack ends inside
    # SQLAlchemy; the user's coroutine is on the parent greenlet's stack.
    greenlet_module = sys.modules.get("greenlet")
    current = greenlet_module.getcurrent() if greenlet_module is not None else None
    while True:
        while frame is not None:
            yield frame
            frame = frame.f_back
        current = current.parent if current is not None else None
        if current is None:
            return
        frame = current.gr_frame


def _generated_by_sqlalchemy(frame: FrameType) -> bool:
    # SQLAlchemy 2.0 compiles its decorator wrappers (deprecation warners
    # such as Query.get's) as "<string>", in globals named for the module of
    # the function they wrap.
    module = frame.f_globals.get("__name__")
    return isinstance(module, str) and (
        module == "sqlalchemy" or module.startswith("sqlalchemy.")
    )


def user_location() -> str | None:
    """
    ``file:line`` of the first frame of the user's own code.

    Failing that, of the first frame outside SQLAlchemy and sessionguard's
    private modules (every frame is installed code); ``None`` if none is.
    """
    fallback = None
    for frame in caller_frames(1):
        filename = frame.f_code.co_filename
        if filename.startswith("<") and _generated_by_sqlalchemy(frame):
            continue
        if is_user_file(filename):
            return f"{filename}:{frame.f_lineno}"
        if (
            fallback is None
            and not filename.startswith(_NEVER)
            and not filename.startswith("<frozen")
            and "greenlet" not in os.path.basename(filename)
        ):
            fallback = f"{filename}:{frame.f_lineno}"
    return fallback
