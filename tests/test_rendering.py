"""How findings read: one rendering of keys, JSON-native fields, singular/plural."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid

from sessionguard import AttributeDiff, StaleRead, StaleReadError
from sessionguard._findings import render_key

KEY = uuid.UUID("6f1c2a9e-0000-4000-8000-000000000001")


def _stale(*names: str, identity: tuple = (KEY,), **kwargs) -> StaleRead:
    return StaleRead(
        session_id=1,
        location="app.py:7",
        entity="User",
        identity=identity,
        attributes=tuple(AttributeDiff(name) for name in names),
        **kwargs,
    )


def test_one_attribute_is_singular_several_are_plural():
    """'attribute `name` differs'; 'attributes `name`, `email` differ'."""
    assert "but attribute `name` differs from the database row." in (
        _stale("name").describe()
    )
    assert "but attributes `name`, `email` differ from the database row." in (
        _stale("name", "email").describe()
    )
    assert "but its row no longer exists." in _stale(deleted=True).describe()


def test_keys_read_as_entity_then_str_of_each_part():
    """`User 6f1c...`, `(1, 2)` for composite keys; never UUID('...') or a tuple repr."""
    assert _stale("name").subject == f"User {KEY}"
    assert str(StaleReadError(_stale("name"))).startswith(
        f"stale read of User {KEY} at app.py:7:"
    )
    assert render_key((1, "b")) == "(1, b)"
    assert render_key([str(KEY)]) == render_key(
        (KEY,)
    )  # a JSON report reads back the same
    assert render_key((datetime.date(2024, 5, 17),)) == "2024-05-17"


def test_to_dict_is_json_native():
    """UUIDs, decimals and dates become strings (ISO for dates); values too."""
    finding = StaleRead(
        session_id=1,
        entity="Order",
        identity=(KEY, datetime.date(2024, 5, 17)),
        attributes=(
            AttributeDiff(
                "paid_at",
                cached=datetime.datetime(2024, 5, 17, 10, 30),
                current=decimal.Decimal("9.50"),
            ),
        ),
    )
    data = finding.to_dict()
    assert data["identity"] == [str(KEY), "2024-05-17"]
    assert data["attributes"] == [
        {"name": "paid_at", "cached": "2024-05-17T10:30:00", "current": "9.50"}
    ]
    assert json.loads(json.dumps(data)) == data
