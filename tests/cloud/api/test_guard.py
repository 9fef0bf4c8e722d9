"""Failed authentications per source address: after a burst the source gets 429 without its credentials
being checked, valid clients behind the same address keep working, other addresses are unaffected."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, cast

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session
from starlette.types import ASGIApp
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from cloud.api import deps
from cloud.api.guard import AuthGuard
from cloud.api.main import create_app
from cloud.registry import apikeys
from cloud.registry.tables import Role
from cloud.settings import Settings
from tests.cloud.api.conftest import basic, bearer
from tests.cloud.api.inventory import Reply, key_id
from tests.cloud.factories import make_cohort, make_device

PROBLEM = "application/problem+json"
DEVICES = "/api/v1/devices"
ARTIFACT = "/api/v1/artifacts/" + "ab" * 32
BURST, WINDOW = 20, 60.0  # the defaults of Settings
ATTACKER, NEIGHBOUR, ELSEWHERE = "203.0.113.7", "203.0.113.7", "198.51.100.9"
WRONG_KEY = bearer("drk_0123456789ab_" + "x" * 43)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(app: FastAPI) -> FakeClock:
    """One clock for the app's guard and key cache."""
    fake = FakeClock()
    app.state.services.guard.clock = fake
    app.state.services.keys.clock = fake
    return fake


@pytest.fixture
def proxied(app: FastAPI) -> Iterator[TestClient]:
    """The app behind uvicorn's proxy-header handling, as `diredi api` runs it behind the nginx front:
    the trusted peer ("testclient") says in X-Forwarded-For which address it is forwarding."""
    front = ProxyHeadersMiddleware(cast("Any", app), trusted_hosts="testclient")  # uvicorn's ASGI types
    with TestClient(cast("ASGIApp", front), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Authorization header whose credentials reached the database."""
    seen: list[str] = []
    check = deps._authenticate

    def counting(session: Session, header: str) -> deps.Caller:
        seen.append(header)
        return check(session, header)

    monkeypatch.setattr(deps, "_authenticate", counting)
    return seen


def source(address: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {"X-Forwarded-For": address, **(headers or {})}


def flood(client: TestClient, address: str, headers: dict[str, str], count: int = BURST) -> list[int]:
    return [client.get(DEVICES, headers=source(address, headers)).status_code for _ in range(count)]


def assert_too_many(response: Reply, retry_after: int | None = None) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert (body["status"], body["title"]) == (429, "Too Many Requests")
    assert body["type"].endswith("/too-many-requests")
    assert "failed authentications" in body["detail"]
    wait = int(response.headers["retry-after"])
    assert wait >= 1
    if retry_after is not None:
        assert wait == retry_after


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.mark.usefixtures("clock")
def test_a_wrong_key_flood_gets_429_after_the_burst_without_its_keys_being_checked(
    proxied: TestClient, checks: list[str], keys: dict[Role, str]
) -> None:
    # Execute
    before = flood(proxied, ATTACKER, WRONG_KEY)
    after = [proxied.get(DEVICES, headers=source(ATTACKER, WRONG_KEY)) for _ in range(5)]
    # a valid key never used from here is a guess that happens to be right: it learns nothing either
    lucky = proxied.get(DEVICES, headers=source(ATTACKER, bearer(keys[Role.viewer])))

    # Assert
    assert before == [401] * BURST
    for response in [*after, lucky]:
        assert_too_many(response, retry_after=int(WINDOW))
    assert len(checks) == BURST  # the refused requests cost no lookup


@pytest.mark.usefixtures("clock")
def test_a_cached_key_from_a_limited_source_is_still_served(
    proxied: TestClient, keys: dict[Role, str]
) -> None:
    # Prepare: a valid client behind the same address (a NAT) as the brute-forcer
    valid = bearer(keys[Role.viewer])
    assert proxied.get(DEVICES, headers=source(NEIGHBOUR, valid)).status_code == 200
    flood(proxied, ATTACKER, WRONG_KEY)

    # Execute
    limited = proxied.get(DEVICES, headers=source(ATTACKER, WRONG_KEY))
    served = proxied.get(DEVICES, headers=source(NEIGHBOUR, valid))

    # Assert
    assert_too_many(limited)
    assert served.status_code == 200


def test_a_known_key_is_checked_again_once_out_of_the_cache_and_a_revoked_one_is_refused(
    proxied: TestClient, clock: FakeClock, session: Session, keys: dict[Role, str]
) -> None:
    # Prepare: both keys worked from this address, then the address was limited
    viewer, operator = bearer(keys[Role.viewer]), bearer(keys[Role.operator])
    for valid in (viewer, operator):
        assert proxied.get(DEVICES, headers=source(NEIGHBOUR, valid)).status_code == 200
    flood(proxied, ATTACKER, WRONG_KEY)
    apikeys.deactivate(session, key_id(keys[Role.operator]))  # through another process: no cache cleared
    session.commit()

    # Execute: past the key cache's few seconds, within the guard's window
    clock.now += 10
    served = proxied.get(DEVICES, headers=source(NEIGHBOUR, viewer))
    revoked = proxied.get(DEVICES, headers=source(NEIGHBOUR, operator))

    # Assert: the known keys were checked against the database, not waved through
    assert served.status_code == 200
    assert revoked.status_code == 401


@pytest.mark.usefixtures("clock")
def test_other_sources_are_unaffected(proxied: TestClient, keys: dict[Role, str]) -> None:
    # Prepare
    flood(proxied, ATTACKER, WRONG_KEY)

    # Execute
    wrong = proxied.get(DEVICES, headers=source(ELSEWHERE, WRONG_KEY))
    valid = proxied.get(DEVICES, headers=source(ELSEWHERE, bearer(keys[Role.viewer])))
    attacker = proxied.get(DEVICES, headers=source(ATTACKER, bearer(keys[Role.viewer])))

    # Assert
    assert wrong.status_code == 401
    assert valid.status_code == 200
    assert attacker.status_code == 200  # now in the key cache: served from any address


def test_the_window_slides_and_the_source_may_try_again(
    proxied: TestClient, clock: FakeClock, keys: dict[Role, str]
) -> None:
    # Prepare: one failure a second, from t=1000 to t=1019
    for _ in range(BURST):
        assert proxied.get(DEVICES, headers=source(ATTACKER, WRONG_KEY)).status_code == 401
        clock.now += 1
    clock.now -= 1

    # Execute
    limited = proxied.get(DEVICES, headers=source(ATTACKER, WRONG_KEY))  # t=1019: the first ages out at 1060
    clock.now = 1000 + WINDOW - 0.5
    still = proxied.get(DEVICES, headers=source(ATTACKER, WRONG_KEY))
    clock.now = 1000 + WINDOW
    again = proxied.get(DEVICES, headers=source(ATTACKER, WRONG_KEY))  # one more try, and it fails
    limited_again = proxied.get(DEVICES, headers=source(ATTACKER, WRONG_KEY))  # until t=1061
    clock.now = 1000 + WINDOW + BURST
    valid = proxied.get(DEVICES, headers=source(ATTACKER, bearer(keys[Role.viewer])))

    # Assert
    assert_too_many(limited, retry_after=41)
    assert_too_many(still, retry_after=1)
    assert again.status_code == 401
    assert_too_many(limited_again, retry_after=1)
    assert valid.status_code == 200


@pytest.mark.usefixtures("clock")
def test_wrong_device_credentials_count_too(proxied: TestClient, session: Session) -> None:
    # Prepare: one device downloaded from this address before; another one never did
    make_cohort(session)
    _, secret = make_device(session, "cam-0001")
    _, other = make_device(session, "cam-0002")
    session.commit()
    assert proxied.get(ARTIFACT, headers=source(NEIGHBOUR, basic("cam-0001", secret))).status_code == 404

    # Execute
    guesses = [
        proxied.get(ARTIFACT, headers=source(ATTACKER, basic("cam-0001", f"guess-{n}"))).status_code
        for n in range(BURST)
    ]
    limited = proxied.get(ARTIFACT, headers=source(ATTACKER, basic("cam-0001", "one-more")))
    known = proxied.get(ARTIFACT, headers=source(NEIGHBOUR, basic("cam-0001", secret)))
    unknown = proxied.get(ARTIFACT, headers=source(NEIGHBOUR, basic("cam-0002", other)))

    # Assert
    assert guesses == [401] * BURST
    assert_too_many(limited)
    assert known.status_code == 404  # authenticated (the artifact is not offered to it)
    assert_too_many(unknown)


@pytest.mark.usefixtures("clock")
def test_requests_without_credentials_do_not_count(proxied: TestClient) -> None:
    # Execute
    answers = flood(proxied, ATTACKER, {}, count=3 * BURST)

    # Assert
    assert answers == [401] * (3 * BURST)


@pytest.mark.usefixtures("clock")
def test_a_limited_source_gets_429_before_its_body_is_validated(proxied: TestClient) -> None:
    # Prepare
    flood(proxied, ATTACKER, WRONG_KEY)
    json_headers = {**WRONG_KEY, "Content-Type": "application/json"}

    # Execute: these reach the validation error handler, which authenticates the caller itself
    malformed = proxied.post("/api/v1/cohorts", content=b"{not json", headers=source(ATTACKER, json_headers))
    repeated = proxied.post(
        "/api/v1/cohorts", content=b'{"id": "a", "id": "b"}', headers=source(ATTACKER, json_headers)
    )
    no_key = proxied.get(DEVICES, headers=source(ATTACKER))

    # Assert
    for response in (malformed, repeated, no_key):
        assert_too_many(response)


@pytest.mark.usefixtures("clock")
def test_a_source_becoming_limited_is_logged_once_and_counted(
    proxied: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    before = {
        name: metric(name)
        for name in (
            "diredi_api_auth_failures_total",
            "diredi_api_auth_sources_limited_total",
            "diredi_api_auth_refused_total",
        )
    }

    # Execute
    with caplog.at_level(logging.WARNING, logger="cloud.api.guard"):
        flood(proxied, ATTACKER, WRONG_KEY, count=BURST + 7)

    # Assert
    warnings = [r.getMessage() for r in caplog.records if r.name == "cloud.api.guard"]
    assert len(warnings) == 1
    assert ATTACKER in warnings[0] and f"{BURST} failed" in warnings[0]
    assert metric("diredi_api_auth_failures_total") - before["diredi_api_auth_failures_total"] == BURST
    assert (
        metric("diredi_api_auth_sources_limited_total") - before["diredi_api_auth_sources_limited_total"] == 1
    )
    assert metric("diredi_api_auth_refused_total") - before["diredi_api_auth_refused_total"] == 7


def test_the_burst_and_window_are_settings(settings: Settings) -> None:
    # Prepare
    update = {"api_auth_failure_burst": 3, "api_auth_failure_window_seconds": 5}
    app = create_app(settings.model_copy(update=update))

    # Execute
    with TestClient(app, raise_server_exceptions=False) as client:
        answers = [client.get(DEVICES, headers=WRONG_KEY) for _ in range(4)]

    # Assert
    assert [r.status_code for r in answers] == [401, 401, 401, 429]
    assert 1 <= int(answers[-1].headers["retry-after"]) <= 5


def test_the_guard_tracks_a_bounded_number_of_sources_and_evicts_the_quietest() -> None:
    # Prepare
    clock = FakeClock()
    guard = AuthGuard(2, 60, max_sources=3, clock=clock)
    for address in ("a", "b"):
        guard.failed(address)
        guard.failed(address)
    assert guard.retry_after("a") == 60  # "a" keeps knocking: now the most recently seen

    # Execute
    guard.failed("c")
    guard.failed("d")  # a fourth address: the quietest ("b") is forgotten

    # Assert
    assert len(guard._failures) == 3
    assert guard.retry_after("b") is None
    assert guard.retry_after("a") == 60


def test_known_credentials_are_bounded_expire_and_are_not_kept_in_plain() -> None:
    # Prepare
    clock = FakeClock()
    guard = AuthGuard(1, 60, max_known=2, known_seconds=100, clock=clock)

    # Execute
    guard.remember("Bearer one")
    guard.remember("Bearer two")
    clock.now += 99
    fresh = guard.known("Bearer one"), guard.known("Bearer two")
    guard.remember("Bearer three")  # full: the oldest ("one") is forgotten
    clock.now += 1

    # Assert
    assert fresh == (True, True)
    assert not guard.known("Bearer one")
    assert not guard.known("Bearer two")  # 100 s since it was verified
    assert guard.known("Bearer three")
    assert not guard.known("Bearer other")
    assert all(b"three" not in digest for digest in guard._known)


def test_the_429_is_documented_on_every_guarded_route(client: TestClient) -> None:
    # Execute
    paths = client.get("/openapi.json").json()["paths"]

    # Assert
    answers = {f"{m.upper()} {p}": op["responses"] for p, item in paths.items() for m, op in item.items()}
    assert "429" not in answers["GET /healthz"]
    undocumented = [
        name
        for name, responses in answers.items()
        if name != "GET /healthz" and "Retry-After" not in responses.get("429", {}).get("headers", {})
    ]
    assert undocumented == []
