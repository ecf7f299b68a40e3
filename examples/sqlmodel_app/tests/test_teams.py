"""The teams API."""

from __future__ import annotations

from app import Hero
from sqlmodel import select


def test_create_team(client, session):
    response = client.post(
        "/teams/", json={"name": "Preventers", "headquarters": "Sharp Tower"}
    )
    assert response.status_code == 201
    assert response.json()["name"] == "Preventers"


def test_create_team_invalid(client, session):
    assert client.post("/teams/", json={"name": "Preventers"}).status_code == 422


def test_read_teams(make_team, client):
    make_team("Preventers")
    make_team("Z-Force", "Sister Margaret's Bar")
    names = [team["name"] for team in client.get("/teams/").json()]
    assert names == ["Preventers", "Z-Force"]


def test_read_team(team, client):
    response = client.get(f"/teams/{team.id}")
    assert response.json()["headquarters"] == "Sister Margaret's Bar"


def test_read_team_not_found(client, session):
    assert client.get("/teams/404").status_code == 404


def test_team_heroes(make_team, make_hero, client):
    team = make_team()
    make_hero("Rusty-Man", "Tommy Sharp", team_id=team["id"])
    make_hero("Deadpond")
    response = client.get(f"/teams/{team['id']}/heroes")
    assert [hero["name"] for hero in response.json()] == ["Rusty-Man"]


def test_team_heroes_empty(team, client):
    assert client.get(f"/teams/{team.id}/heroes").json() == []


def test_team_heroes_not_found(client, session):
    assert client.get("/teams/404/heroes").status_code == 404


def test_hero_joins_team(team, hero, client):
    client.patch(f"/heroes/{hero.id}", json={"team_id": team.id})
    assert [h["id"] for h in client.get(f"/teams/{team.id}/heroes").json()] == [hero.id]


def test_delete_team(make_team, client):
    team = make_team()
    assert client.delete(f"/teams/{team['id']}").json() == {"ok": True}
    assert client.get(f"/teams/{team['id']}").status_code == 404


def test_delete_team_keeps_its_heroes(make_team, make_hero, client, db):
    team = make_team()
    created = make_hero(team_id=team["id"])
    client.delete(f"/teams/{team['id']}")
    assert client.get(f"/heroes/{created['id']}").json()["team_id"] is None
    heroes = db(lambda s: s.exec(select(Hero)).all())
    assert [hero.team_id for hero in heroes] == [None]


def test_delete_team_not_found(client, session):
    assert client.delete("/teams/404").status_code == 404
