"""ASGI middleware that opens a :func:`~sessionguard.request_context` per request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._context import request_context

__all__ = ["RequestContextMiddleware"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestContextMiddleware:
    """
    Wrap an ASGI app so that each HTTP or WebSocket request is a request context.

    The request id is the ``X-Request-ID`` header when the client sent one,
    otherwise a generated one. ``app.add_middleware(RequestContextMiddleware)``
    in Starlette and FastAPI.
    """

    def __init__(self, app: ASGIApp, header: str = "x-request-id") -> None:
        self.app = app
        self.header = header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope.get("headers") or ():
            if name.lower() == self.header:
                request_id = value.decode("latin-1")
                break
        with request_context(request_id):
            await self.app(scope, receive, send)
