"""FastAPI dependencies: the request's session, the services on the app, and who is calling.

Reads (every GET, and authentication) run on the event loop through an asynchronous autocommit
session that calls the sync registry functions with `run_sync` (the device listing, the busiest, on a
connection of the same engine: `list_devices_async`); writes run in the thread pool in one
transaction (`SessionDep`) that the route commits.
"""

import base64
import binascii
import email.message
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import unquote

from cryptography import x509
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from cloud.api.guard import AuthGuard
from cloud.api.problems import Problem
from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import InvalidValueError
from cloud.fleet_ca import (
    CLAIM_CA_NAME,
    CLAIM_PREFIX,
    FleetCA,
    certificate_sha256,
    common_name,
    load_certificate,
)
from cloud.provisioning import CredentialHook
from cloud.registry import apikeys
from cloud.registry.common import hash_secret
from cloud.registry.db import async_reader_factory
from cloud.registry.devices import authenticate_device, device_by_certificate
from cloud.registry.tables import Device, Role
from cloud.settings import Settings
from cloud.signing import KeyRing
from wire.topics import DEVICE_ID_PATTERN


@dataclass(frozen=True)
class Caller:
    """Who made the request: an operator's API key (with a role) or a device."""

    actor: str  # for the audit log: `key:<id>`, `device:<id>` or `claim:<batch>`
    role: Role | None = None
    device: Device | None = None
    claim: str | None = None  # a claim certificate's batch: it may only enrol devices


class KeyCache:
    """API keys this process has checked recently, so a client's requests skip the lookup.

    Keyed by the token's SHA-256 (the plaintext is not kept), bounded, and emptied when a key is
    revoked through this process; a key revoked through another process works here for at most
    `seconds` more. The lookup was a tenth of a device listing's CPU in the API, and a query more
    for the database on every request.
    """

    def __init__(
        self, seconds: float, capacity: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.seconds = seconds
        self.capacity = capacity
        self.clock = clock
        self._entries: dict[str, tuple[float, Caller]] = {}

    def get(self, token: str) -> Caller | None:
        """The caller `token` authenticated as, if checked less than `seconds` ago."""
        entry = self._entries.get(hash_secret(token)) if self.seconds > 0 else None
        if entry is None or self.clock() >= entry[0]:
            return None
        return entry[1]

    def put(self, token: str, caller: Caller) -> None:
        """Remember that `token` authenticated as `caller`."""
        if self.seconds <= 0:
            return
        if len(self._entries) >= self.capacity:
            self._entries.clear()  # many distinct keys at once is not the case to optimise
        self._entries[hash_secret(token)] = (self.clock() + self.seconds, caller)

    def clear(self) -> None:
        """Forget every key (a key was revoked)."""
        self._entries.clear()


@dataclass
class Services:
    """What the routes use, created once when the app starts."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: LocalArtifactStore
    keyring: KeyRing
    hooks: list[CredentialHook]
    keys: KeyCache
    guard: AuthGuard
    # Bound to the event loop, so made when the app starts (the lifespan) and closed when it stops.
    readers: async_sessionmaker[AsyncSession] | None = None
    ca: FleetCA | None = None  # opened (made, the first time) when a device first asks for a certificate
    claims: FleetCA | None = None

    def fleet_ca(self) -> FleetCA:
        """The fleet CA that certifies devices' keys."""
        if self.ca is None:
            self.ca = FleetCA.open(self.settings.resolved_fleet_ca_dir)
        return self.ca

    def claim_ca(self) -> FleetCA | None:
        """The CA of claim certificates, once `diredi claims issue` made it; None before."""
        if self.claims is None and (self.settings.resolved_claim_ca_dir / "ca.key").exists():
            self.claims = FleetCA.open(self.settings.resolved_claim_ca_dir, name=CLAIM_CA_NAME)
        return self.claims

    async def start(self) -> None:
        """Open the asynchronous reader engine on the running event loop."""
        self.readers = async_reader_factory(
            self.settings.resolved_database_url, pool_size=self.settings.api_db_connections
        )

    def reader(self) -> AsyncSession:
        """A new asynchronous autocommit session for reads on the event loop (use it in `async with`)."""
        return self._readers()()

    def reader_engine(self) -> AsyncEngine:
        """The engine of the reader sessions (autocommit, on the event loop)."""
        engine: AsyncEngine = self._readers().kw["bind"]
        return engine

    def _readers(self) -> async_sessionmaker[AsyncSession]:
        if self.readers is None:
            raise RuntimeError("the API's services are not started (run the app with its lifespan)")
        return self.readers

    async def close(self) -> None:
        """Close every pooled database connection."""
        if self.readers is not None:
            await self.readers.kw["bind"].dispose()
            self.readers = None
        self.sessions.kw["bind"].dispose()


async def get_services(request: Request) -> Services:
    """The services the app was created with."""
    services: Services = request.app.state.services
    return services


async def get_session(services: Annotated[Services, Depends(get_services)]) -> AsyncIterator[Session]:
    """A sync session for one write transaction (the route commits), closed in the thread pool."""
    session = services.sessions()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


async def get_reader(request: Request) -> AsyncIterator[AsyncSession]:
    """An asynchronous autocommit session for reads on the event loop. (It takes the request rather than
    `ServicesDep`: each dependency costs every request its resolution.)"""
    async with (await get_services(request)).reader() as session:
        yield session


ServicesDep = Annotated[Services, Depends(get_services)]
SessionDep = Annotated[Session, Depends(get_session)]  # one transaction, committed by the route
ReaderDep = Annotated[AsyncSession, Depends(get_reader)]  # reads on the event loop, each statement on its own

DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
MAX_SECRET = 128
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="diredi", Basic realm="diredi-devices"'}


def unauthorized() -> Problem:
    """The 401 every guarded route answers without valid credentials."""
    return Problem(
        401,
        "Unauthorized",
        "a valid API key (Bearer) or device credentials (Basic) are needed",
        headers=CHALLENGE,
    )


def _authenticate(session: Session, header: str) -> Caller:
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
        # Only well-formed credentials reach the database (a NUL in an id would be a DataError there).
        well_formed = DEVICE_ID.fullmatch(device_id) is not None and 0 < len(secret) <= MAX_SECRET
        device = authenticate_device(session, device_id, secret) if well_formed else None
        if device is not None:
            return Caller(actor=f"device:{device.id}", device=device)
    raise unauthorized()


def _touch(session: Session, key_id: str) -> None:
    # last_used_at is informational: written at most once a minute, in a transaction of its own that
    # starts with the write (SQLite cannot upgrade a read transaction while another writer commits),
    # and skipped rather than failing the request when the database is busy.
    try:
        apikeys.touch(session, key_id)
        session.commit()
    except OperationalError:
        session.rollback()


def _source(request: Request) -> str:
    # The peer's address, or the client's as a trusted proxy (uvicorn's --forwarded-allow-ips) gave it.
    return request.client.host if request.client is not None else "unknown"


# Set by the nginx front only (deploy/nginx/nginx.conf): the client certificate it verified against the
# fleet CA (URL-escaped PEM), and the secret it shares with the API, without which the first is ignored.
DEVICE_CERTIFICATE = "x-device-certificate"
FRONT_HEADER = "x-diredi-front"


def _front_certificate(request: Request, settings: Settings) -> x509.Certificate | None:
    """The client certificate the front verified, or None when it sent none; a 401 problem for a
    certificate that did not come from the front, or is not one."""
    escaped = request.headers.get(DEVICE_CERTIFICATE)
    if not escaped:
        return None
    secret = settings.front_secret.get_secret_value().encode() if settings.front_secret else b""
    if not secret or not hmac.compare_digest(request.headers.get(FRONT_HEADER, "").encode(), secret):
        raise unauthorized()  # a device certificate is taken from the front alone
    try:
        return load_certificate(unquote(escaped).encode())
    except (InvalidValueError, UnicodeEncodeError):
        raise unauthorized() from None


def _claim(services: Services, certificate: x509.Certificate) -> Caller | None:
    """A claim caller when the claim CA issued `certificate` (the front checked it is current)."""
    claims = services.claim_ca()
    name = common_name(certificate)
    if claims is None or name is None or not name.startswith(CLAIM_PREFIX) or not claims.signed(certificate):
        return None
    batch = name.removeprefix(CLAIM_PREFIX)
    return Caller(actor=f"claim:{batch}", claim=batch)


def _authenticate_certificate(session: Session, sha256: str) -> Caller:
    device = device_by_certificate(session, sha256)
    if device is None:
        raise unauthorized()
    return Caller(actor=f"device:{device.id}", device=device)


async def authenticate(request: Request) -> Caller:
    """Who is calling, or a 401 problem (429 for a source with too many failed authentications). A key
    this process checked within seconds is not looked up again; otherwise the lookup has a reader
    session of its own, closed before the route runs. A device may also be known by the certificate the
    front verified (`_front_certificate`)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    services = await get_services(request)
    keys, guard = services.keys, services.guard
    bearer = scheme.lower() == "bearer"
    if bearer and (cached := keys.get(token.strip())) is not None:
        return cached  # served even from a limited source: a guess is never in the cache
    source = _source(request)
    if (wait := guard.refusal(source, header)) is not None:
        raise Problem(
            429,
            "Too Many Requests",
            f"too many failed authentications from {source}; try again in {wait} s",
            headers={"Retry-After": str(wait)},
        )
    try:
        certificate = _front_certificate(request, services.settings)
        if certificate is not None and (claim := _claim(services, certificate)) is not None:
            return claim
        async with services.reader() as reader:
            if certificate is not None:
                return await reader.run_sync(_authenticate_certificate, certificate_sha256(certificate))
            caller = await reader.run_sync(_authenticate, header)
    except Problem:
        if header or DEVICE_CERTIFICATE in request.headers:  # a request without credentials guesses nothing
            guard.failed(source)
        raise
    guard.remember(header)
    if bearer:
        keys.put(token.strip(), caller)
    return caller


async def authentication_problem(request: Request) -> Problem | None:
    """None when the request carries valid credentials, else the problem to answer (401 or 429); for
    error paths that run before the route's own guard."""
    if (await get_services(request)).readers is None:
        return unauthorized()
    try:
        await authenticate(request)
    except Problem as problem:
        return problem
    return None


class RequireRole:
    """Lets through operators whose key has at least `role`; devices and lower roles get 403."""

    def __init__(self, role: Role) -> None:
        self.role = role

    async def __call__(self, request: Request) -> Caller:
        caller = await authenticate(request)
        if caller.role is None or caller.role.rank < self.role.rank:
            raise Problem(403, "Forbidden", f"this needs an API key with role {self.role.value} or higher")
        return caller


class RequireDeviceOrRole(RequireRole):
    """Lets through any authenticated device (the route checks what it may see), or operators with `role`."""

    async def __call__(self, request: Request) -> Caller:
        caller = await authenticate(request)
        if caller.device is None and (caller.role is None or caller.role.rank < self.role.rank):
            raise Problem(
                403, "Forbidden", f"this needs device credentials or role {self.role.value} or higher"
            )
        return caller


class RequireClaim:
    """Lets through the holders of a claim certificate alone (enrolment)."""

    async def __call__(self, request: Request) -> Caller:
        caller = await authenticate(request)
        if caller.claim is None:
            raise Problem(403, "Forbidden", "this needs a claim certificate, presented to the front")
        return caller


Viewer = Annotated[Caller, Depends(RequireRole(Role.viewer))]
Operator = Annotated[Caller, Depends(RequireRole(Role.operator))]
Admin = Annotated[Caller, Depends(RequireRole(Role.admin))]
DeviceOrOperator = Annotated[Caller, Depends(RequireDeviceOrRole(Role.operator))]
Claim = Annotated[Caller, Depends(RequireClaim())]


def single_valued_query(request: Request) -> None:
    """Refuse a query parameter given more than once: every parameter of this API takes one value,
    and keeping one of them silently would hide the caller's mistake. (A validation error: an
    unauthenticated caller still gets the 401.)"""
    seen: set[str] = set()
    for key, _ in request.query_params.multi_items():
        if key in seen:
            raise RequestValidationError(
                [{"type": "repeated", "loc": ("query", key), "msg": "is given more than once", "input": None}]
            )
        seen.add(key)


class _Duplicate(Exception):
    """A JSON object gives a key more than once."""


class _Repeated(dict[str, Any]):
    """A JSON object that gave `key` more than once (json keeps the last value; we refuse it)."""

    def __init__(self, pairs: list[tuple[str, Any]], key: str) -> None:
        super().__init__(pairs)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) < len(pairs):
        raise _Duplicate
    return found


def _marked(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return _Repeated(pairs, key)
        seen.add(key)
    return dict(pairs)


def repeated_key(body: bytes) -> tuple[str | int, ...] | None:
    """Where a JSON document gives an object key more than once (the path to it, ending with the key),
    or None; a document that does not parse is left to the route's own parser to refuse."""
    try:
        json.loads(body, object_pairs_hook=_unique)  # the common case: one pass, nothing kept
        return None
    except _Duplicate:
        document = json.loads(body, object_pairs_hook=_marked)  # refused anyway: find where
    except (ValueError, RecursionError):
        return None
    pending: list[tuple[tuple[str | int, ...], Any]] = [((), document)]
    while pending:  # iterative: JSON nests deeper than Python's recursion limit allows
        path, value = pending.pop()
        if isinstance(value, _Repeated):
            return (*path, value.key)
        if isinstance(value, dict):
            pending.extend(((*path, key), item) for key, item in value.items())
        elif isinstance(value, list):
            pending.extend(((*path, index), item) for index, item in enumerate(value))
    return None


def _is_json(content_type: str | None) -> bool:
    # The media types FastAPI parses as JSON (fastapi.routing.get_request_handler).
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


async def strict_json_body(request: Request) -> None:
    """Refuse a JSON body that gives an object key more than once, at any depth: JSON parsers keep one of
    the values and silently drop the other, so `{"id": "a", "id": "b"}` could mean either. (A validation
    error, like a repeated query parameter: an unauthenticated caller still gets the 401.)"""
    if getattr(request.scope.get("route"), "body_field", None) is None or not _is_json(
        request.headers.get("content-type")
    ):
        return  # the route reads no JSON body: nothing was parsed, nothing to check
    body = await request.body()  # already read (and cached) by FastAPI before any dependency runs
    if not body or (path := repeated_key(body)) is None:
        return
    raise RequestValidationError(
        [
            {
                "type": "duplicate_key",
                "loc": ("body", *path),
                "msg": f"duplicate key {path[-1]!r} in one object (which value was meant?)",
                "input": None,
            }
        ]
    )


async def well_formed_request(request: Request) -> None:
    """The checks every request passes, as the app's one dependency of its own: no query parameter
    given twice, no JSON object key given twice. (FastAPI resolves each dependency on every request,
    and runs a plain function in its thread pool: one asynchronous dependency costs the least.)"""
    single_valued_query(request)
    await strict_json_body(request)


class PageQuery(BaseModel):
    """Pagination of every list: `limit` rows from `offset`; unknown query parameters are refused."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(100, ge=1, le=500)
    offset: int = Field(0, ge=0, le=1_000_000_000)
