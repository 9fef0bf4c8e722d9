"""API fixtures: the real app on the test database (SQLite and PostgreSQL), keys of every role."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cloud.api.main import create_app
from cloud.artifacts import LocalArtifactStore
from cloud.registry import apikeys
from cloud.registry.tables import Role
from cloud.settings import Settings

FRONT_SECRET = "f" * 32


@pytest.fixture
def settings(engine: Engine, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=engine.url.render_as_string(hide_password=False),
        api_max_body_bytes=64 * 1024,
        api_tune_gc=False,  # a server setting; the test process makes many apps
        front_secret=SecretStr(FRONT_SECRET),  # believed with a certificate header (tests of the front's)
    )


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    yield create_app(settings)  # its lifespan (run by TestClient) opens and closes the engines


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def store(app: FastAPI) -> LocalArtifactStore:
    """The app's own artifact store."""
    return app.state.services.store  # type: ignore[no-any-return]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(device_id: str, secret: str) -> dict[str, str]:
    token = base64.b64encode(f"{device_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _key(sessions: sessionmaker[Session], role: Role) -> str:
    with sessions() as session:
        _, plaintext = apikeys.create_key(session, role=role, name=f"test {role.value}")
        session.commit()
    return plaintext


@pytest.fixture
def keys(sessions: sessionmaker[Session]) -> dict[Role, str]:
    """One API key per role."""
    return {role: _key(sessions, role) for role in Role}


@pytest.fixture
def admin(keys: dict[Role, str]) -> dict[str, str]:
    return bearer(keys[Role.admin])


@pytest.fixture
def operator(keys: dict[Role, str]) -> dict[str, str]:
    return bearer(keys[Role.operator])


@pytest.fixture
def viewer(keys: dict[Role, str]) -> dict[str, str]:
    return bearer(keys[Role.viewer])
