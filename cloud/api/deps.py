"""FastAPI dependencies: the request's session, the services on the app, and who is calling."""

import base64
import binascii
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cloud.api.problems import Problem
from cloud.artifacts import LocalArtifactStore
from cloud.provisioning import CredentialHook
from cloud.registry import apikeys
from cloud.registry.devices import authenticate_device
from cloud.registry.tables import Device, Role
from cloud.settings import Settings
from cloud.signing import KeyRing


@dataclass
class Services:
    """What the routes use, created once when the app starts."""

    settings: Settings
    sessions: sessionmaker[Session]
    readers: sessionmaker[Session]  # autocommit: a GET costs no BEGIN/ROLLBACK round trips
    store: LocalArtifactStore
    keyring: KeyRing
    hooks: list[CredentialHook]

    def close(self) -> None:
        """Close every pooled database connection."""
        for factory in (self.sessions, self.readers):
            factory.kw["bind"].dispose()


def get_services_sync(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_services(request: Request) -> Services:
    return get_services_sync(request)


async def get_session(services: Annotated[Services, Depends(get_services)]) -> AsyncIterator[Session]:
    session = services.sessions()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


async def get_read_session(services: Annotated[Services, Depends(get_services)]) -> AsyncIterator[Session]:
    session = services.readers()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


ServicesDep = Annotated[Services, Depends(get_services)]
SessionDep = Annotated[Session, Depends(get_session)]  # one transaction, committed by the route
ReadSessionDep = Annotated[Session, Depends(get_read_session)]  # each statement on its own (reads)

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="diredi", Basic realm="diredi-devices"'}


@dataclass(frozen=True)
class Caller:
    """Who made the request: an operator's API key (with a role) or a device."""

    actor: str  # for the audit log: `key:<id>` or `device:<id>`
    role: Role | None = None
    device: Device | None = None


def _authenticate(request: Request, session: Session) -> Caller:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and credentials:
        key = apikeys.authenticate(session, credentials.strip())
        if key is not None:
            if apikeys.needs_touch(key):
                _touch(session, key.id)
            return Caller(actor=f"key:{key.id}", role=key.role)
    elif scheme == "basic" and credentials:
        try:
            device_id, _, secret = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            device_id, secret = "", ""
        device = authenticate_device(session, device_id, secret) if device_id and secret else None
        if device is not None:
            return Caller(actor=f"device:{device.id}", device=device)
    raise Problem(
        401,
        "Unauthorized",
        "a valid API key (Bearer) or device credentials (Basic) are needed",
        headers=CHALLENGE,
    )


def _touch(session: Session, key_id: str) -> None:
    # last_used_at is informational: written at most once a minute, in a transaction of its own that
    # starts with the write (SQLite cannot upgrade a read transaction while another writer commits),
    # and skipped rather than failing the request when the database is busy.
    try:
        apikeys.touch(session, key_id)
        session.commit()
    except OperationalError:
        session.rollback()


def is_authenticated(request: Request) -> bool:
    """Whether the request carries valid credentials of either kind (for error paths before routing)."""
    services = get_services_sync(request)
    with services.readers() as session:
        try:
            _authenticate(request, session)
        except Problem:
            return False
    return True


class RequireRole:
    """Lets through operators whose key has at least `role`; devices and lower roles get 403."""

    def __init__(self, role: Role) -> None:
        self.role = role

    def __call__(self, request: Request, session: ReadSessionDep) -> Caller:
        caller = _authenticate(request, session)
        if caller.role is None or caller.role.rank < self.role.rank:
            raise Problem(403, "Forbidden", f"this needs an API key with role {self.role.value} or higher")
        return caller


class RequireDeviceOrRole(RequireRole):
    """Lets through any authenticated device (the route checks what it may see), or operators with `role`."""

    def __call__(self, request: Request, session: ReadSessionDep) -> Caller:
        caller = _authenticate(request, session)
        if caller.device is None and (caller.role is None or caller.role.rank < self.role.rank):
            raise Problem(
                403, "Forbidden", f"this needs device credentials or role {self.role.value} or higher"
            )
        return caller


Viewer = Annotated[Caller, Depends(RequireRole(Role.viewer))]
Operator = Annotated[Caller, Depends(RequireRole(Role.operator))]
Admin = Annotated[Caller, Depends(RequireRole(Role.admin))]
DeviceOrOperator = Annotated[Caller, Depends(RequireDeviceOrRole(Role.operator))]


class PageQuery(BaseModel):
    """Pagination of every list: `limit` rows from `offset`; unknown query parameters are refused."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(100, ge=1, le=500)
    offset: int = Field(0, ge=0, le=1_000_000_000)
