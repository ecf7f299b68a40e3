"""The classic bug, end to end: a session outlives a request and reads a stale row."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from sessionguard import StaleRead, StaleReadError, install_guard

from .models import User


def test_stale_get_is_returned_then_caught(db, seed):
    """Without a guard get() returns the old name; with one, the read is reported."""
    seed(db)
    engine, writer = db.engine(), db.engine()
    session = Session(engine, expire_on_commit=False)
    user = session.get(User, 1)
    session.commit()
    with Session(writer) as other:
        other.execute(update(User).values(name="bob"))
        other.commit()

    assert session.get(User, 1).name == "alice"  # the bug: stale value returned

    guard = install_guard(engine)
    assert session.get(User, 1) is user
    assert user.name == "alice"
    [finding] = guard.findings
    assert isinstance(finding, StaleRead)
    assert (finding.entity, finding.identity, finding.deleted) == ("User", (1,), False)
    assert [diff.name for diff in finding.attributes] == ["name"]
    assert finding.location is not None
    assert finding.location.startswith(__file__)
    session.close()


def test_stale_select_raises_with_on_stale_raise(db, seed):
    """on_stale='raise' turns the stale select() into StaleReadError at the read."""
    seed(db)
    engine, writer = db.engine(), db.engine()
    session = Session(engine, expire_on_commit=False)
    user = session.scalars(select(User)).one()
    session.commit()
    with Session(writer) as other:
        other.execute(update(User).values(name="bob"))
        other.commit()
    assert session.scalars(select(User)).one().name == "alice"

    install_guard(engine, on_stale="raise")
    with pytest.raises(
        StaleReadError, match=r"User 1 at .*attribute `name` differs"
    ) as info:
        session.scalars(select(User)).one()
    assert info.value.finding.entity == "User"
    assert user.name == "alice"
    session.close()
