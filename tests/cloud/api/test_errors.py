"""Every error the app can answer is RFC 9457 application/problem+json: the router's 404 and 405, the
limits at the door, validation, authentication, and unexpected exceptions in a route or a middleware."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from cloud.api.main import create_app
from cloud.api.problems import PROBLEM_TYPE, TITLES
from cloud.registry.tables import Role
from cloud.settings import Settings
from tests.cloud.api.conftest import bearer
from tests.cloud.api.inventory import Reply

PROBLEM = "application/problem+json"
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Error:
    """A request the app must answer with `status` as a problem (`allow`: the Allow header expected)."""

    method: str
    url: str
    status: int
    role: Role | None = Role.admin  # whose key is sent; None: no credentials
    kwargs: dict[str, Any] = field(default_factory=dict)
    allow: str | None = None


CASES: dict[str, Error] = {
    "unknown route": Error("GET", "/api/v1/nothing", 404),
    "unknown route, no credentials": Error("GET", "/api/v1/nothing", 404, role=None),
    "unknown route, garbage body": Error(
        "POST", "/api/v1/nothing", 404, None, {"content": b"{", "headers": JSON}
    ),
    "unknown route, duplicate keys": Error(
        "POST", "/api/v1/nothing", 404, kwargs={"content": b'{"a": 1, "a": 2}', "headers": JSON}
    ),
    "method not allowed": Error("DELETE", "/api/v1/devices", 405, allow="GET, POST"),
    "method not allowed, no credentials": Error("PUT", "/api/v1/cohorts", 405, role=None, allow="GET, POST"),
    "method not allowed on a path parameter": Error(
        "DELETE", "/api/v1/devices/cam-0001", 405, allow="GET, PATCH"
    ),
    "method not allowed on healthz": Error("POST", "/healthz", 405, role=None, allow="GET"),
    "OPTIONS": Error("OPTIONS", "/api/v1/cohorts", 405, allow="GET, POST"),
    "HEAD of a GET route": Error("HEAD", "/api/v1/devices", 405, allow="GET, POST"),
    "HEAD of an unknown route": Error("HEAD", "/api/v1/nothing", 404),
    "body over the limit": Error(
        "POST", "/api/v1/cohorts", 413, kwargs={"content": b"x" * 70_000, "headers": JSON}
    ),
    "NUL in the path": Error("GET", "/api/v1/cohorts/kit%00chen", 400),
    "Content-Length not a number": Error(
        "POST", "/api/v1/cohorts", 400, kwargs={"content": b"", "headers": {**JSON, "Content-Length": "ten"}}
    ),
    "body not UTF-8": Error(
        "POST", "/api/v1/cohorts", 400, kwargs={"content": b'{"id": "\xff\xfe"}', "headers": JSON}
    ),
    "malformed JSON": Error(
        "POST", "/api/v1/cohorts", 422, kwargs={"content": b"{not json", "headers": JSON}
    ),
    "duplicate keys": Error(
        "POST", "/api/v1/cohorts", 422, kwargs={"content": b'{"id": "a", "id": "b"}', "headers": JSON}
    ),
    "invalid query": Error("GET", "/api/v1/devices", 422, kwargs={"params": {"limit": "ten"}}),
    "no credentials": Error("GET", "/api/v1/devices", 401, role=None),
    "role too low": Error(
        "POST", "/api/v1/api-keys", 403, role=Role.viewer, kwargs={"json": {"role": "viewer"}}
    ),
    "unknown resource": Error("GET", "/api/v1/devices/cam-nobody", 404),
}


def assert_problem(response: Reply, status: int, head: bool = False) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    if head:
        assert response.content == b""  # a HEAD answer has no body, but says what it would be
        return
    body = response.json()
    title = TITLES[status]
    assert body["status"] == status
    assert body["title"] == title
    assert body["type"] == PROBLEM_TYPE + title.lower().replace(" ", "-")
    assert body["detail"]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_error_is_problem_json(client: TestClient, keys: dict[Role, str], case: Error) -> None:
    # Prepare
    kwargs = dict(case.kwargs)
    headers = {**(bearer(keys[case.role]) if case.role else {}), **kwargs.pop("headers", {})}

    # Execute
    response = client.request(case.method, case.url, headers=headers, **kwargs)

    # Assert
    assert_problem(response, case.status, head=case.method == "HEAD")
    if case.allow is not None:
        assert response.headers["allow"] == case.allow
        if case.method != "HEAD":
            assert case.allow in response.json()["detail"]


def test_the_404_of_an_unknown_route_names_the_path(client: TestClient) -> None:
    # Execute
    response = client.get("/api/v2/devices")

    # Assert
    assert response.json()["detail"] == "no route /api/v2/devices"


class Boom:
    """A middleware that fails on /middleware-boom before the app is called."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/middleware-boom":
            raise RuntimeError("secret detail from a middleware")
        await self.app(scope, receive, send)


@pytest.fixture
def failing(settings: Settings) -> FastAPI:
    """The app with a route and a middleware that raise an unexpected exception."""
    app = create_app(settings)

    @app.get("/route-boom")
    def route_boom() -> None:
        raise RuntimeError("secret detail from a route")

    app.add_middleware(Boom)
    return app


@pytest.mark.parametrize("path", ["/route-boom", "/middleware-boom"])
def test_an_unexpected_exception_is_a_logged_500_problem(
    failing: FastAPI, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    # Execute
    with caplog.at_level(logging.ERROR, logger="cloud.api.handlers"):
        with TestClient(failing, raise_server_exceptions=False) as client:
            response = client.get(path)

    # Assert
    assert_problem(response, 500)
    assert "secret detail" not in response.text  # the exception is logged, never answered
    logged = [r for r in caplog.records if r.name == "cloud.api.handlers"]
    assert len(logged) == 1 and path in logged[0].getMessage()
    assert logged[0].exc_info is not None and "secret detail" in str(logged[0].exc_info[1])
