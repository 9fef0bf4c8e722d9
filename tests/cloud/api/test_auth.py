"""Every route but /healthz needs credentials and the right role; the routes are read from the app."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.orm import Session

from cloud.api.deps import Caller, KeyCache
from cloud.api.main import create_app
from cloud.fleet_ca import FleetCA
from cloud.registry import apikeys
from cloud.registry.devices import Certificate, provision_certificate_device, revoke_device
from cloud.registry.tables import Role
from cloud.settings import Settings
from device_firmware_py.identity import device_key, signing_request
from tests.cloud.api.conftest import basic, bearer
from tests.cloud.api.inventory import PUBLIC, Endpoint, Reply, endpoints, key_id
from tests.cloud.factories import make_cohort, make_device

PROBLEM = "application/problem+json"
BAD_CREDENTIALS: dict[str, dict[str, str]] = {
    "none": {},
    "empty bearer": {"Authorization": "Bearer "},
    "garbage bearer": {"Authorization": "Bearer not-a-key"},
    "unknown key": bearer("drk_0123456789ab_" + "x" * 43),
    "overlong key": bearer("drk_" + "x" * 200),
    "garbage basic": {"Authorization": "Basic !!!not-base64!!!"},
    "basic without colon": {"Authorization": "Basic " + base64.b64encode(b"cam-0001").decode()},
    "basic not utf-8": {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode()},
    "unknown device": basic("cam-nobody", "secret"),
    "other scheme": {"Authorization": "Token abc"},
    # A device certificate is public: the API takes it from the front alone (which sends the secret).
    "certificate not from the front": {"X-Device-Certificate": "-----BEGIN%20CERTIFICATE-----"},
    "certificate with a guessed secret": {"X-Device-Certificate": "x", "X-Diredi-Front": "guess"},
}


def guarded(app: FastAPI) -> list[Endpoint]:
    return [e for e in endpoints(app) if (e.method, e.path) not in PUBLIC]


def call(client: TestClient, endpoint: Endpoint, headers: dict[str, str]) -> Reply:
    """Call the endpoint with a plausible URL (and an empty JSON object as the body of a POST)."""
    body: dict[str, Any] | None = {} if endpoint.mutating else None
    return client.request(endpoint.method, endpoint.url(), headers=headers, json=body)


def is_unauthorized(response: Reply) -> bool:
    return (
        response.status_code == 401
        and "Bearer" in response.headers.get("www-authenticate", "")
        and response.headers["content-type"] == PROBLEM
        and response.json()["status"] == 401
    )


def device_credentials(session: Session, device_id: str = "cam-0001") -> dict[str, str]:
    make_cohort(session)
    _, secret = make_device(session, device_id)
    session.commit()
    return basic(device_id, secret)


def test_every_route_but_healthz_declares_a_role(app: FastAPI) -> None:
    # Execute
    found = endpoints(app)

    # Assert
    unguarded = [
        e.name for e in found if e.role is None and not e.claims and (e.method, e.path) not in PUBLIC
    ]
    assert unguarded == []
    assert PUBLIC <= {(e.method, e.path) for e in found}
    assert len(found) >= 25  # the enumeration sees through included routers
    roles = {e.name: e.role for e in found}
    assert roles["POST /api/v1/api-keys"] is Role.admin
    assert roles["POST /api/v1/devices"] is Role.operator
    assert roles["GET /api/v1/devices"] is Role.viewer
    assert [e.name for e in found if e.devices] == ["GET /api/v1/artifacts/{sha256}"]


def test_healthz_needs_no_credentials(client: TestClient) -> None:
    # Execute
    response = client.get("/healthz")

    # Assert
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("kind", BAD_CREDENTIALS)
@pytest.mark.usefixtures("keys")
def test_bad_or_missing_credentials_get_401_everywhere(app: FastAPI, client: TestClient, kind: str) -> None:
    # Prepare: one failure per route from one address is a flood; this test is about each route's
    # own 401, the flood's 429 is test_guard.py's
    headers = BAD_CREDENTIALS[kind]
    app.state.services.guard.burst = len(guarded(app)) + 1

    # Execute
    answers = {e.name: call(client, e, headers) for e in guarded(app)}

    # Assert
    wrong = {name: r.status_code for name, r in answers.items() if not is_unauthorized(r)}
    assert wrong == {}


def test_roles_below_the_required_one_get_403(
    app: FastAPI, client: TestClient, keys: dict[Role, str]
) -> None:
    # Prepare
    cases = [(e, role) for e in guarded(app) for role in Role if e.role and role.rank < e.role.rank]

    # Execute
    answers = {(e.name, role.value): call(client, e, bearer(keys[role])) for e, role in cases}

    # Assert
    assert len(cases) >= 15
    wrong = {case: r.status_code for case, r in answers.items() if r.status_code != 403}
    assert wrong == {}
    assert all(r.headers["content-type"] == PROBLEM for r in answers.values())


def test_device_credentials_get_403_on_operator_routes(
    app: FastAPI, client: TestClient, session: Session
) -> None:
    # Prepare
    headers = device_credentials(session)

    # Execute
    answers = {e.name: call(client, e, headers) for e in guarded(app) if not e.devices}

    # Assert
    wrong = {name: r.status_code for name, r in answers.items() if r.status_code != 403}
    assert wrong == {}


@pytest.mark.parametrize("above", [0, 1, 2])
def test_the_required_role_and_above_get_through(
    app: FastAPI, client: TestClient, keys: dict[Role, str], above: int
) -> None:
    # Prepare
    cases = [
        (e, list(Role)[e.role.rank + above])
        for e in guarded(app)
        if e.role is not None and e.role.rank + above < len(Role)
    ]

    # Execute
    answers = {(e.name, role.value): call(client, e, bearer(keys[role])) for e, role in cases}

    # Assert
    refused = {case: r.status_code for case, r in answers.items() if r.status_code in (401, 403)}
    assert refused == {}
    assert all(r.status_code < 500 for r in answers.values())


def test_a_device_gets_through_to_its_artifact_route(client: TestClient, session: Session) -> None:
    # Prepare
    headers = device_credentials(session)

    # Execute
    response = client.get("/api/v1/artifacts/" + "ab" * 32, headers=headers)

    # Assert: authenticated, but the artifact is not offered to it
    assert response.status_code == 404


def test_a_revoked_device_gets_401(client: TestClient, session: Session) -> None:
    # Prepare
    headers = device_credentials(session)
    revoke_device(session, "cam-0001")
    session.commit()

    # Execute
    response = client.get("/api/v1/artifacts/" + "ab" * 32, headers=headers)

    # Assert
    assert is_unauthorized(response)


def test_a_device_with_a_wrong_secret_gets_401(client: TestClient, session: Session) -> None:
    # Prepare
    device_credentials(session)

    # Execute
    response = client.get("/api/v1/artifacts/" + "ab" * 32, headers=basic("cam-0001", "wrong"))

    # Assert
    assert is_unauthorized(response)


def test_a_deactivated_api_key_gets_401(
    client: TestClient, keys: dict[Role, str], admin: dict[str, str]
) -> None:
    # Prepare
    victim = keys[Role.operator]
    assert client.get("/api/v1/devices", headers=bearer(victim)).status_code == 200

    # Execute
    revoked = client.post(f"/api/v1/api-keys/{key_id(victim)}/revoke", headers=admin)
    after = client.get("/api/v1/devices", headers=bearer(victim))

    # Assert
    assert revoked.status_code == 200
    assert revoked.json()["active"] is False
    assert is_unauthorized(after)


def test_unauthenticated_requests_are_refused_before_the_body_is_validated(client: TestClient) -> None:
    # Execute
    response = client.post(
        "/api/v1/cohorts", content=b"{not json", headers={"Content-Type": "application/json"}
    )

    # Assert: a 422 would tell a stranger how the route parses its body
    assert is_unauthorized(response)


@pytest.mark.parametrize("headers", [{}, BAD_CREDENTIALS["unknown key"]], ids=["none", "unknown key"])
def test_unauthenticated_requests_with_duplicate_keys_get_401(
    client: TestClient, headers: dict[str, str]
) -> None:
    # Execute
    response = client.post(
        "/api/v1/cohorts",
        content=b'{"id": "garden", "id": "porch"}',
        headers={**headers, "Content-Type": "application/json"},
    )

    # Assert
    assert is_unauthorized(response)


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_the_api_description_is_public(client: TestClient, path: str) -> None:
    # Execute: FastAPI serves these itself; they describe the API but hold no fleet data
    response = client.get(path)

    # Assert
    assert response.status_code == 200


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_revoked_by_another_process_works_here_until_the_cache_forgets_it(
    app: FastAPI, client: TestClient, session: Session, keys: dict[Role, str]
) -> None:
    # Prepare
    clock = FakeClock()
    cache = app.state.services.keys
    cache.clock = clock
    victim = bearer(keys[Role.viewer])
    assert client.get("/api/v1/devices", headers=victim).status_code == 200

    # Execute
    apikeys.deactivate(session, key_id(keys[Role.viewer]))  # as another API process would
    session.commit()
    clock.now += cache.seconds - 0.1
    within = client.get("/api/v1/devices", headers=victim)
    clock.now += 0.2
    after = client.get("/api/v1/devices", headers=victim)

    # Assert
    assert within.status_code == 200
    assert is_unauthorized(after)


def test_device_credentials_are_checked_on_every_request(client: TestClient, session: Session) -> None:
    # Prepare
    make_cohort(session)
    _, secret = make_device(session, "cam-0001")
    session.commit()
    headers = basic("cam-0001", secret)
    assert client.get("/api/v1/artifacts/" + "ab" * 32, headers=headers).status_code == 404

    # Execute
    revoke_device(session, "cam-0001")
    session.commit()
    after = client.get("/api/v1/artifacts/" + "ab" * 32, headers=headers)

    # Assert
    assert is_unauthorized(after)


def test_the_key_cache_expires_is_bounded_and_can_be_off() -> None:
    # Prepare
    clock = FakeClock()
    cache = KeyCache(5, capacity=2, clock=clock)
    off = KeyCache(0, clock=clock)
    caller = Caller(actor="key:a", role=Role.viewer)

    # Execute
    cache.put("token-a", caller)
    off.put("token-a", caller)
    fresh = cache.get("token-a")
    clock.now += 5
    expired = cache.get("token-a")
    cache.put("token-b", caller)
    cache.put("token-c", caller)  # full (a and b): starts again

    # Assert
    assert fresh == caller
    assert expired is None
    assert off.get("token-a") is None
    assert len(cache._entries) == 1 and cache.get("token-c") == caller
    assert "token-c" not in cache._entries  # keyed by hash, never the plaintext


@pytest.mark.parametrize("case", ["garbage", "not utf-8", "unknown certificate", "revoked device"])
def test_a_certificate_from_the_front_that_names_no_active_device_gets_401(
    settings: Settings, session: Session, tmp_path: Path, case: str
) -> None:
    # Prepare: the API shares a secret with its front; a certificate device, revoked in one case
    secret = "s" * 32
    ca = FleetCA.open(tmp_path / "ca")
    issued = ca.issue(signing_request(device_key(tmp_path), "cam-0001"), "cam-0001")
    make_cohort(session)
    provision_certificate_device(
        session,
        device_id="cam-0001",
        cohort_id="kitchen",
        certificate=Certificate(issued.serial, issued.sha256, issued.not_after),
    )
    if case == "revoked device":
        revoke_device(session, "cam-0001")
    session.commit()
    other = ca.issue(signing_request(ec.generate_private_key(ec.SECP256R1()), "cam-0002"), "cam-0002")
    header = {
        "garbage": "not-a-certificate",
        "not utf-8": "%FF%FE",
        "unknown certificate": quote(other.pem, safe=""),
        "revoked device": quote(issued.pem, safe=""),
    }[case]
    app = create_app(settings.model_copy(update={"front_secret": SecretStr(secret)}))

    # Execute
    with TestClient(app) as client:
        refused = client.get(
            "/api/v1/artifacts/" + "ab" * 32,
            headers={"X-Device-Certificate": header, "X-Diredi-Front": secret},
        )
        known = client.get(
            "/api/v1/artifacts/" + "ab" * 32,
            headers={"X-Device-Certificate": quote(issued.pem, safe=""), "X-Diredi-Front": secret},
        )

    # Assert: refused; the device's own certificate gets through (404: nothing is offered to it)
    assert is_unauthorized(refused)
    assert known.status_code == (401 if case == "revoked device" else 404)
