"""
A small FastAPI app with the usual session-per-request dependency.

Nothing here is wrong: every request gets its own session from ``get_session``.
The bug lives in the test suite (``tests/conftest.py``), which overrides
``get_session`` with one session shared by every request of a test.
"""

import os
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from models import User
from pydantic import BaseModel, ConfigDict
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

engine = create_engine(os.environ.get("DATABASE_URL", "sqlite:///./app.sqlite"))
SessionLocal = sessionmaker(engine)


def get_session() -> Iterator[Session]:
    """One session per request, closed when the response is sent."""
    with SessionLocal() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

app = FastAPI(title="sessionguard example")


class UserIn(BaseModel):
    name: str
    email: str


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    email: str


class Rename(BaseModel):
    name: str


def _user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise HTTPException(status_code=404, detail=f"no user {user_id}")
    return user


@app.post("/users", status_code=201)
def create_user(data: UserIn, session: SessionDep) -> UserOut:
    user = User(name=data.name, email=data.email)
    session.add(user)
    session.commit()
    return UserOut.model_validate(user)


@app.get("/users/{user_id}")
def read_user(user_id: int, session: SessionDep) -> UserOut:
    return UserOut.model_validate(_user(session, user_id))


@app.patch("/users/{user_id}")
def rename_user(user_id: int, data: Rename, session: SessionDep) -> UserOut:
    user = _user(session, user_id)
    user.name = data.name
    session.commit()
    return UserOut.model_validate(user)
