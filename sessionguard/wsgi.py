"""WSGI middleware that opens a :func:`~sessionguard.request_context` per request."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._context import enter_request

__all__ = ["RequestContextMiddleware"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class RequestContextMiddleware:
    """
    Wrap a WSGI app so that each request, body iteration included, is a request
    context. The request id is the ``X-Request-ID`` header when sent.
    """

    def __init__(self, app: WSGIApp, environ_key: str = "HTTP_X_REQUEST_ID") -> None:
        self.app = app
        self.environ_key = environ_key

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        # A context of its own, so that a streamed body is iterated inside it
        # too, after this call has returned.
        context = contextvars.copy_context()
        context.run(enter_request, environ.get(self.environ_key))
        body = context.run(self.app, environ, start_response)
        return _ContextBody(body, context)


class _ContextBody:
    """The app's response body, iterated (and closed) inside the request context."""

    def __init__(self, body: Iterable[bytes], context: contextvars.Context) -> None:
        self._body = body
        self._context = context
        self._iterator: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = self._context.run(iter, self._body)
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            self._context.run(close)
