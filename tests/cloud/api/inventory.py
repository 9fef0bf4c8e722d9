"""The application's routes as the tests see them: method, path, the role each needs, sample paths."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts

from cloud.api.deps import RequireClaim, RequireDeviceOrRole, RequireRole
from cloud.registry.tables import Role

# FastAPI serves these itself, without credentials (see the report: they describe the API, no data).
DOCS_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
PUBLIC = frozenset({("GET", "/healthz")})
SAMPLE_SHA256 = "ab" * 32


class Reply(Protocol):
    """What the tests read of a TestClient response (httpx2 or httpx, whichever Starlette uses)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    @property
    def content(self) -> bytes: ...
    @property
    def request(self) -> Any: ...
    def json(self) -> Any: ...


@dataclass(frozen=True)
class Endpoint:
    """One method of one route, with the guard it declares (None: public or unguarded)."""

    method: str
    path: str
    role: Role | None
    devices: bool  # device credentials are let through (the route checks what the device may see)
    claims: bool  # claim certificates alone are let through (enrolment)
    path_params: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def mutating(self) -> bool:
        return self.method not in {"GET", "HEAD", "OPTIONS"}

    def url(self, **values: str) -> str:
        """The path with each parameter replaced by `values[name]` or a plausible sample."""
        path = self.path
        for name, annotation in self.path_params:
            path = path.replace("{" + name + "}", values.get(name) or sample_value(name, annotation))
        return path


def find_guard(dependant: Dependant) -> RequireRole | RequireClaim | None:
    """The RequireRole (or RequireDeviceOrRole, or RequireClaim) among the dependencies, depth first."""
    for dependency in dependant.dependencies:
        if isinstance(dependency.call, RequireRole | RequireClaim):
            return dependency.call
        found = find_guard(dependency)
        if found is not None:
            return found
    return None


def sample_value(name: str, annotation: Any) -> str:
    """A plausible value of a path parameter: a UUID, a sha256, or an id-like string."""
    if annotation is uuid.UUID:
        return str(uuid.uuid4())
    if name == "sha256":
        return SAMPLE_SHA256
    return f"probe-{name.replace('_', '-')}"


def endpoints(app: FastAPI) -> list[Endpoint]:
    """Every API route and method of `app`; anything that is not an APIRoute must be FastAPI's docs."""
    found = []
    for context in iter_route_contexts(app.routes):
        if not isinstance(context.original_route, APIRoute):
            assert context.path in DOCS_PATHS, f"unexpected non-API route {context.path}"
            continue
        dependant: Dependant = context.dependant
        guard = find_guard(dependant)
        params = tuple((p.name, p.field_info.annotation) for p in dependant.path_params)
        for method in sorted(context.methods or ()):
            found.append(
                Endpoint(
                    method=method,
                    path=str(context.path),
                    role=guard.role if isinstance(guard, RequireRole) else None,
                    devices=isinstance(guard, RequireDeviceOrRole),
                    claims=isinstance(guard, RequireClaim),
                    path_params=params,
                )
            )
    return found


def key_id(plaintext: str) -> str:
    """The public id of an API key (`drk_<id>_<secret>`), as the audit log names its actor."""
    return plaintext.split("_")[1]
