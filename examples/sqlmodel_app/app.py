"""
A FastAPI + SQLModel app on PostgreSQL through asyncpg.

Nothing here is wrong: every request gets its own ``AsyncSession`` from
``get_session``. What the example shows is its test suite
(``tests/conftest.py``), which shares one session between the tests and every
request they make, the usual way: TestClient plus a dependency override.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import Field, Relationship, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

DATABASE_URL = os.environ.get(
    "DATABASE_URL", "postgresql+asyncpg://postgres@localhost/heroes"
)
engine = create_async_engine(DATABASE_URL)


class TeamBase(SQLModel):
    name: str = Field(index=True)
    headquarters: str


class Team(TeamBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    heroes: list["Hero"] = Relationship(back_populates="team")


class TeamPublic(TeamBase):
    id: int


class HeroBase(SQLModel):
    name: str = Field(index=True)
    secret_name: str
    age: int | None = Field(default=None, index=True)
    team_id: int | None = Field(default=None, foreign_key="team.id")


class Hero(HeroBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    team: Team | None = Relationship(back_populates="heroes")


class HeroPublic(HeroBase):
    id: int


class HeroUpdate(SQLModel):
    name: str | None = None
    secret_name: str | None = None
    age: int | None = None
    team_id: int | None = None


async def get_session() -> AsyncIterator[AsyncSession]:
    """One session per request."""
    async with AsyncSession(engine) as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as connection:
        await connection.run_sync(SQLModel.metadata.create_all)
    yield


app = FastAPI(title="heroes", lifespan=lifespan)


async def _hero(session: AsyncSession, hero_id: int) -> Hero:
    hero = await session.get(Hero, hero_id)
    if hero is None:
        raise HTTPException(status_code=404, detail="Hero not found")
    return hero


async def _team(session: AsyncSession, team_id: int) -> Team:
    team = await session.get(Team, team_id)
    if team is None:
        raise HTTPException(status_code=404, detail="Team not found")
    return team


@app.post("/heroes/", response_model=HeroPublic, status_code=201)
async def create_hero(hero: HeroBase, session: SessionDep) -> Hero:
    if hero.team_id is not None:
        await _team(session, hero.team_id)
    db_hero = Hero.model_validate(hero)
    session.add(db_hero)
    await session.commit()
    await session.refresh(db_hero)
    return db_hero


@app.get("/heroes/", response_model=list[HeroPublic])
async def read_heroes(
    session: SessionDep,
    offset: int = 0,
    limit: Annotated[int, Query(le=100)] = 100,
    min_age: int | None = None,
) -> list[Hero]:
    statement = select(Hero).order_by(Hero.id).offset(offset).limit(limit)
    if min_age is not None:
        statement = statement.where(Hero.age >= min_age)
    return list((await session.exec(statement)).all())


@app.get("/heroes/{hero_id}", response_model=HeroPublic)
async def read_hero(hero_id: int, session: SessionDep) -> Hero:
    return await _hero(session, hero_id)


@app.patch("/heroes/{hero_id}", response_model=HeroPublic)
async def update_hero(hero_id: int, hero: HeroUpdate, session: SessionDep) -> Hero:
    db_hero = await _hero(session, hero_id)
    changes = hero.model_dump(exclude_unset=True)
    if changes.get("team_id") is not None:
        await _team(session, changes["team_id"])
    db_hero.sqlmodel_update(changes)
    session.add(db_hero)
    await session.commit()
    await session.refresh(db_hero)
    return db_hero


@app.delete("/heroes/{hero_id}")
async def delete_hero(hero_id: int, session: SessionDep) -> dict[str, bool]:
    await session.delete(await _hero(session, hero_id))
    await session.commit()
    return {"ok": True}


@app.post("/teams/", response_model=TeamPublic, status_code=201)
async def create_team(team: TeamBase, session: SessionDep) -> Team:
    db_team = Team.model_validate(team)
    session.add(db_team)
    await session.commit()
    await session.refresh(db_team)
    return db_team


@app.get("/teams/", response_model=list[TeamPublic])
async def read_teams(session: SessionDep) -> list[Team]:
    return list((await session.exec(select(Team).order_by(Team.id))).all())


@app.get("/teams/{team_id}", response_model=TeamPublic)
async def read_team(team_id: int, session: SessionDep) -> Team:
    return await _team(session, team_id)


@app.get("/teams/{team_id}/heroes", response_model=list[HeroPublic])
async def read_team_heroes(team_id: int, session: SessionDep) -> list[Hero]:
    await _team(session, team_id)
    statement = select(Hero).where(Hero.team_id == team_id).order_by(Hero.id)
    return list((await session.exec(statement)).all())


@app.delete("/teams/{team_id}")
async def delete_team(team_id: int, session: SessionDep) -> dict[str, bool]:
    team = await _team(session, team_id)
    statement = select(Hero).where(Hero.team_id == team_id)
    for hero in (await session.exec(statement)).all():
        hero.team_id = None
        session.add(hero)
    await session.delete(team)
    await session.commit()
    return {"ok": True}
