"""API tests; one of them reads a stale row without noticing."""

from __future__ import annotations

from models import User
from sqlalchemy import Engine, update


def test_create_then_read(client):
    """A user created through the API can be read back."""
    created = client.post("/users", json={"name": "bob", "email": "bob@example.com"})
    assert created.status_code == 201
    response = client.get(f"/users/{created.json()['id']}")
    assert response.json()["name"] == "bob"


def test_rename(client, alice):
    """A rename through the API is what the next read returns."""
    client.patch(f"/users/{alice.id}", json={"name": "alicia"})
    assert client.get(f"/users/{alice.id}").json()["name"] == "alicia"


def test_read_unknown_user(client):
    """An unknown id is a 404."""
    assert client.get("/users/404").status_code == 404


def test_support_tool_changes_email(client, alice, support_tool: Engine):
    """The API still serves the old email: the shared session hid the change."""
    with support_tool.begin() as connection:
        connection.execute(
            update(User).where(User.id == alice.id).values(email="new@example.com")
        )
    response = client.get(f"/users/{alice.id}")
    # Passes without sessionguard: nobody looked at the email, which is stale.
    assert response.status_code == 200
    assert response.json()["name"] == "alice"
