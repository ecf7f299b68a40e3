"""The heroes API."""

from __future__ import annotations

import pytest
from app import Hero
from sqlmodel import select


def test_create_hero(client, session):
    response = client.post(
        "/heroes/", json={"name": "Deadpond", "secret_name": "Dive Wilson"}
    )
    assert response.status_code == 201
    data = response.json()
    assert data["name"] == "Deadpond"
    assert data["secret_name"] == "Dive Wilson"
    assert data["age"] is None
    assert data["id"] is not None


def test_create_hero_with_age(make_hero):
    assert make_hero(age=48)["age"] == 48


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "Deadpond"},
        {"secret_name": "Dive Wilson"},
        {"name": "Deadpond", "secret_name": "Dive Wilson", "age": "old"},
    ],
)
def test_create_hero_invalid(client, session, payload):
    assert client.post("/heroes/", json=payload).status_code == 422


def test_create_hero_in_unknown_team(client, session):
    response = client.post(
        "/heroes/", json={"name": "A", "secret_name": "B", "team_id": 999}
    )
    assert response.status_code == 404


def test_create_hero_is_stored(make_hero, db):
    created = make_hero()
    stored = db(lambda s: s.exec(select(Hero).where(Hero.id == created["id"])).one())
    assert stored.secret_name == "Dive Wilson"


def test_read_heroes_empty(client, session):
    assert client.get("/heroes/").json() == []


def test_read_heroes(make_hero, client):
    make_hero("Deadpond")
    make_hero("Rusty-Man", "Tommy Sharp", age=48)
    names = [hero["name"] for hero in client.get("/heroes/").json()]
    assert names == ["Deadpond", "Rusty-Man"]


def test_read_heroes_paginated(make_hero, client):
    for number in range(5):
        make_hero(f"Hero {number}")
    response = client.get("/heroes/", params={"offset": 2, "limit": 2})
    assert [hero["name"] for hero in response.json()] == ["Hero 2", "Hero 3"]


def test_read_heroes_limit_too_large(client, session):
    assert client.get("/heroes/", params={"limit": 101}).status_code == 422


def test_read_heroes_min_age(make_hero, client):
    make_hero("Young", age=16)
    make_hero("Old", age=93)
    make_hero("Unknown")
    response = client.get("/heroes/", params={"min_age": 30})
    assert [hero["name"] for hero in response.json()] == ["Old"]


def test_read_hero(make_hero, client):
    created = make_hero()
    response = client.get(f"/heroes/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created


def test_read_hero_fixture(hero, client):
    response = client.get(f"/heroes/{hero.id}")
    assert response.json()["name"] == "Spider-Boy"


def test_read_hero_not_found(client, session):
    response = client.get("/heroes/404")
    assert response.status_code == 404
    assert response.json() == {"detail": "Hero not found"}


def test_update_hero(make_hero, client):
    created = make_hero()
    response = client.patch(f"/heroes/{created['id']}", json={"name": "Deadpuddle"})
    assert response.status_code == 200
    assert response.json()["name"] == "Deadpuddle"
    assert response.json()["secret_name"] == "Dive Wilson"


def test_update_hero_then_read(hero, client):
    client.patch(f"/heroes/{hero.id}", json={"age": 17})
    assert client.get(f"/heroes/{hero.id}").json()["age"] == 17
    assert hero.age == 17  # the test's object is the request's object


def test_update_hero_not_found(client, session):
    assert client.patch("/heroes/404", json={"name": "x"}).status_code == 404


def test_update_hero_invalid(make_hero, client):
    created = make_hero()
    response = client.patch(f"/heroes/{created['id']}", json={"age": "old"})
    assert response.status_code == 422


def test_update_hero_team(make_hero, make_team, client):
    created, team = make_hero(), make_team()
    response = client.patch(f"/heroes/{created['id']}", json={"team_id": team["id"]})
    assert response.json()["team_id"] == team["id"]


def test_delete_hero(make_hero, client):
    created = make_hero()
    assert client.delete(f"/heroes/{created['id']}").json() == {"ok": True}
    assert client.get(f"/heroes/{created['id']}").status_code == 404


def test_delete_hero_not_found(client, session):
    assert client.delete("/heroes/404").status_code == 404


def test_delete_hero_is_gone_from_the_database(hero, client, db):
    client.delete(f"/heroes/{hero.id}")
    assert db(lambda s: s.exec(select(Hero)).all()) == []
