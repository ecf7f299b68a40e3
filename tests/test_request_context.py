"""Request contexts, the ASGI and WSGI middlewares, and expire={'request'}."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from sessionguard import SharedSession, install_guard, request_context
from sessionguard._context import current_request
from sessionguard.asgi import RequestContextMiddleware as ASGIMiddleware
from sessionguard.wsgi import RequestContextMiddleware as WSGIMiddleware

from .models import User


def _rename(db: Any, name: str) -> None:
    with db.engine().begin() as connection:
        connection.execute(update(User).where(User.id == 1).values(name=name))


def test_request_context_is_current_inside_and_gone_after():
    """request_context() sets the current request for its block only."""
    assert current_request() is None
    with request_context("abc") as outer:
        assert current_request() is outer
        assert outer.request_id == "abc"
        with request_context() as inner:
            assert current_request() is inner
            assert inner.request_id.startswith("request-")
        assert current_request() is outer
    assert current_request() is None


def test_shared_session_without_expiry_is_a_finding(db, seed):
    """A session used in two request contexts is reported, and really reads stale."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine)
    session = Session(engine, expire_on_commit=False)
    with request_context("first"):
        user = session.get(User, 1)
        session.commit()
    _rename(db, "bob")
    with request_context("second"):
        assert session.get(User, 1).name == "alice"  # the classic bug
    kinds = [f.kind for f in guard.findings]
    assert kinds == ["shared_session", "stale_read"]
    shared = guard.findings[0]
    assert isinstance(shared, SharedSession)
    assert (shared.previous_request_id, shared.request_id) == ("first", "second")
    assert guard.findings[1].request_id == "second"
    session.close()
    del user


def test_expire_on_request_reads_fresh_data_even_through_get(db, seed):
    """With expire={'request'} a get() in a new request context reloads the row."""
    seed(db)
    engine = db.engine()
    session = Session(engine, expire_on_commit=False)
    with request_context():
        user = session.get(User, 1)
        session.commit()
    _rename(db, "bob")
    with request_context():
        assert session.get(User, 1).name == "alice"  # without the guard: stale
    session.close()

    guard = install_guard(engine, expire={"request"})
    session = Session(engine, expire_on_commit=False)
    with request_context():
        user = session.get(User, 1)
        session.commit()
    _rename(db, "carol")
    with request_context():
        assert session.get(User, 1).name == "carol"
    assert guard.findings == []
    assert guard.stats().expire_all_calls == 1
    session.close()
    del user


def test_expire_on_request_keeps_unflushed_changes_and_reports_them(sqlite_db, seed):
    """Unflushed changes carried into a new request are kept and reported."""
    seed(sqlite_db)
    engine = sqlite_db.engine()
    guard = install_guard(engine, expire={"request"})
    session = Session(engine, expire_on_commit=False)
    with request_context("first"):
        user = session.get(User, 1)
        user.name = "edited in the first request"
    with request_context("second"):
        session.scalars(select(User.id)).all()  # the second request's first read
        session.commit()
    with Session(sqlite_db.engine()) as check:
        assert check.get(User, 1).name == "edited in the first request"
    [shared] = [f for f in guard.findings if f.kind == "shared_session"]
    assert shared.pending_objects == 1
    session.close()


def test_asgi_middleware_opens_one_context_per_request():
    """The ASGI middleware gives each HTTP request its own context, with X-Request-ID."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(current_request())

    middleware = ASGIMiddleware(app)

    async def run() -> None:
        await middleware(
            {"type": "http", "headers": [(b"x-request-id", b"r-1")]}, None, None
        )  # type: ignore[arg-type]
        await middleware({"type": "http", "headers": []}, None, None)  # type: ignore[arg-type]
        await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]

    asyncio.run(run())
    first, second, lifespan = seen
    assert first.request_id == "r-1"
    assert second is not None
    assert second is not first
    assert lifespan is None
    assert current_request() is None


def test_wsgi_middleware_covers_the_streamed_body():
    """The WSGI middleware's context is current while the body is iterated, too."""
    seen: list[Any] = []

    def app(environ: Any, start_response: Any) -> Any:
        seen.append(current_request())
        start_response("200 OK", [])

        def body() -> Any:
            seen.append(current_request())
            yield b"chunk"

        return body()

    middleware = WSGIMiddleware(app)
    body = middleware({"HTTP_X_REQUEST_ID": "w-1"}, lambda *args: None)
    assert list(body) == [b"chunk"]
    body.close()  # type: ignore[attr-defined]
    assert [context.request_id for context in seen] == ["w-1", "w-1"]
    assert current_request() is None


def test_session_used_before_any_request_is_expired_on_its_first(db, seed):
    """A session warmed up outside any request is expired when a request first uses it."""
    seed(db)
    engine = db.engine()
    guard = install_guard(engine, expire={"request"})
    session = Session(engine, expire_on_commit=False)
    user = session.get(User, 1)  # at start-up, outside any request
    session.commit()
    _rename(db, "bob")
    with request_context():
        assert session.get(User, 1).name == "bob"
    assert guard.findings == []
    assert guard.stats().expire_all_calls == 1
    session.close()
    del user
