"""Request contexts: units of work that sessions should not outlive."""

from __future__ import annotations

import contextvars
import itertools
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["RequestContext", "current_request", "enter_request", "request_context"]

_ids = itertools.count(1)


class RequestContext:
    """One unit of work, as opened by :func:`request_context`."""

    __slots__ = ("__weakref__", "request_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"<RequestContext {self.request_id!r}>"


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "sessionguard_request", default=None
)


def current_request() -> RequestContext | None:
    """The innermost active request context, or ``None``."""
    return _current.get()


def enter_request(request_id: str | None = None) -> RequestContext:
    """Make a new request context current, for a context that will be discarded."""
    context = RequestContext(
        request_id if request_id is not None else f"request-{next(_ids)}"
    )
    _current.set(context)
    return context


@contextmanager
def request_context(request_id: str | None = None) -> Iterator[RequestContext]:
    """
    Mark a unit of work, such as one HTTP request.

    Findings made inside carry its ``request_id``; with ``expire={"request"}``
    a session first used in a new request context is expired, and a session
    used by two request contexts is reported as ``shared_session``. The
    ASGI and WSGI middlewares open one per request.
    """
    context = RequestContext(
        request_id if request_id is not None else f"request-{next(_ids)}"
    )
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
