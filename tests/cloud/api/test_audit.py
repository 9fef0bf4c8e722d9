"""Every mutating route writes one audit entry naming the calling key and the action; the routes are
read from the app, so a new mutating route without an entry in CALLS fails here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.fleet_ca import CLAIM_CA_NAME, FleetCA
from cloud.registry import apikeys
from cloud.registry.models import decide
from cloud.registry.tables import AuditLog, Role
from cloud.settings import Settings
from device_firmware_py.identity import signing_request
from tests.cloud.api.conftest import FRONT_SECRET, bearer
from tests.cloud.api.inventory import Endpoint, Reply, endpoints, key_id
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model


@dataclass
class World:
    """Rows every mutating call can act on."""

    device_id: str
    candidates: list[str]  # two candidate models
    approved: str  # an approved model
    spare_key: str  # the id of a key to revoke
    to_roll_out: str = ""  # an approved model no call retires
    rollout_id: str = ""  # the rollout the create call started
    job_id: str = ""  # the job the trigger call started


@dataclass(frozen=True)
class Expected:
    """What a successful call returned and the audit entry it should leave."""

    response: Reply
    action: str
    target: str


Call = Callable[[TestClient, dict[str, str], World], Expected]


def create_cohort(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    response = client.post("/api/v1/cohorts", json={"id": "garden"}, headers=headers)
    return Expected(response, "cohort.create", "garden")


def provision_device(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    body = {"id": "cam-0002", "cohort_id": "kitchen"}
    return Expected(
        client.post("/api/v1/devices", json=body, headers=headers), "device.provision", "cam-0002"
    )


def revoke_device(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    response = client.post(f"/api/v1/devices/{world.device_id}/revoke", headers=headers)
    return Expected(response, "device.revoke", world.device_id)


def decide_model(action: str, pick: Callable[[World], str]) -> Call:
    def call(client: TestClient, headers: dict[str, str], world: World) -> Expected:
        model_id = pick(world)
        body = {"reason": f"{action} in a test"}
        response = client.post(f"/api/v1/models/{model_id}/{action}", json=body, headers=headers)
        return Expected(response, f"model.{action}", model_id)

    return call


def create_key(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    response = client.post("/api/v1/api-keys", json={"role": "viewer", "name": "ci"}, headers=headers)
    return Expected(response, "apikey.create", response.json()["key"]["id"])


def label_device(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    response = client.patch(
        f"/api/v1/devices/{world.device_id}", json={"labels": {"tier": "beta"}}, headers=headers
    )
    return Expected(response, "device.label", world.device_id)


def command_device(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    # cam-0002, which provision_device made: world.device_id may be revoked by now, and takes no commands
    response = client.post(
        "/api/v1/devices/cam-0002/commands", json={"command": "report_now"}, headers=headers
    )
    return Expected(response, "device.command", "cam-0002")


def revoke_key(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    response = client.post(f"/api/v1/api-keys/{world.spare_key}/revoke", headers=headers)
    return Expected(response, "apikey.revoke", world.spare_key)


def start_rollout(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    response = client.post("/api/v1/rollouts", json={"model_id": world.to_roll_out}, headers=headers)
    world.rollout_id = response.json().get("id", "")
    return Expected(response, "rollout.create", world.rollout_id)


def steer_rollout(action: str) -> Call:
    def call(client: TestClient, headers: dict[str, str], world: World) -> Expected:
        response = client.post(f"/api/v1/rollouts/{world.rollout_id}/{action}", headers=headers)
        return Expected(response, f"rollout.{action}", world.rollout_id)

    return call


def trigger_job(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    body = {"type": "rd_cycle", "cohort_id": "kitchen"}
    response = client.post("/api/v1/jobs", json=body, headers=headers)
    world.job_id = response.json().get("id", "")
    return Expected(response, "job.trigger", world.job_id)


def cancel_job(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    response = client.post(f"/api/v1/jobs/{world.job_id}/cancel", headers=headers)
    return Expected(response, "job.cancel", world.job_id)


def retry_job(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    response = client.post(f"/api/v1/jobs/{world.job_id}/retry", headers=headers)
    return Expected(response, "job.retry", response.json().get("id", ""))


def preregister(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    body = {"serial": "cam-0100", "cohort_id": "kitchen"}
    response = client.post("/api/v1/enrolments", json=body, headers=headers)
    return Expected(response, "enrolment.preregister", "cam-0100")


def request_enrolment(client: TestClient, headers: dict[str, str], world: World) -> Expected:
    """cam-0101 asks with its batch's claim (as the front passes it on); an operator decides below."""
    csr = signing_request(ec.generate_private_key(ec.SECP256R1()), "cam-0101")
    response = client.post("/api/v1/enrol", json={"serial": "cam-0101", "csr": csr}, headers=headers)
    return Expected(response, "enrolment.request", "cam-0101")


def decide_enrolment(action: str) -> Call:
    def call(client: TestClient, headers: dict[str, str], world: World) -> Expected:
        body = {"cohort_id": "kitchen"} if action == "approve" else None
        response = client.post(f"/api/v1/enrolments/cam-0101/{action}", json=body, headers=headers)
        return Expected(response, f"enrolment.{action}", "cam-0101")

    return call


def claim_headers(settings: Settings) -> dict[str, str]:
    """A claim certificate of batch b1, as the front passes it on."""
    ca = FleetCA.open(settings.resolved_claim_ca_dir, name=CLAIM_CA_NAME)
    _, issued = ca.issue_claim("b1")
    return {"X-Device-Certificate": quote(issued.pem, safe=""), "X-Diredi-Front": FRONT_SECRET}


CALLS: dict[tuple[str, str], Call] = {
    ("POST", "/api/v1/enrolments"): preregister,
    ("POST", "/api/v1/enrol"): request_enrolment,
    ("POST", "/api/v1/enrolments/{serial}/approve"): decide_enrolment("approve"),
    ("POST", "/api/v1/enrolments/{serial}/refuse"): decide_enrolment("refuse"),
    ("POST", "/api/v1/cohorts"): create_cohort,
    ("POST", "/api/v1/devices"): provision_device,
    ("POST", "/api/v1/devices/{device_id}/revoke"): revoke_device,
    ("PATCH", "/api/v1/devices/{device_id}"): label_device,
    ("POST", "/api/v1/devices/{device_id}/commands"): command_device,
    ("POST", "/api/v1/models/{model_id}/approve"): decide_model("approve", lambda w: w.candidates[0]),
    ("POST", "/api/v1/models/{model_id}/reject"): decide_model("reject", lambda w: w.candidates[1]),
    ("POST", "/api/v1/models/{model_id}/retire"): decide_model("retire", lambda w: w.approved),
    ("POST", "/api/v1/api-keys"): create_key,
    ("POST", "/api/v1/api-keys/{key_id}/revoke"): revoke_key,
    ("POST", "/api/v1/jobs"): trigger_job,
    ("POST", "/api/v1/jobs/{job_id}/cancel"): cancel_job,
    ("POST", "/api/v1/jobs/{job_id}/retry"): retry_job,
    ("POST", "/api/v1/rollouts"): start_rollout,
    ("POST", "/api/v1/rollouts/{rollout_id}/pause"): steer_rollout("pause"),
    ("POST", "/api/v1/rollouts/{rollout_id}/resume"): steer_rollout("resume"),
    ("POST", "/api/v1/rollouts/{rollout_id}/halt"): steer_rollout("halt"),  # stopped: still rolled back below
    ("POST", "/api/v1/rollouts/{rollout_id}/rollback"): steer_rollout("rollback"),
}


@pytest.fixture
def world(session: Session, store: LocalArtifactStore) -> World:
    make_cohort(session)
    make_device(session, "cam-0001")
    teacher = make_cloud_model(session, store)
    models = [make_edge_model(session, store, teacher_id=teacher.id).id for _ in range(4)]
    decide(session, models[2], approve=True)
    decide(session, models[3], approve=True)
    spare, _ = apikeys.create_key(session, role=Role.viewer, name="spare")
    session.commit()
    return World(
        device_id="cam-0001",
        candidates=models[:2],
        approved=models[2],
        spare_key=spare.id,
        to_roll_out=models[3],
    )


def mutating(app: FastAPI) -> list[Endpoint]:
    return [e for e in endpoints(app) if e.mutating]


def audit_rows(sessions: sessionmaker[Session]) -> list[AuditLog]:
    with sessions() as session:
        return list(session.scalars(select(AuditLog).order_by(AuditLog.id)))


def test_every_mutating_route_has_a_call_in_the_table(app: FastAPI) -> None:
    # Execute
    routes = {(e.method, e.path) for e in mutating(app)}

    # Assert
    assert routes == set(CALLS)


def test_every_mutating_call_writes_one_audit_entry(
    app: FastAPI,
    client: TestClient,
    sessions: sessionmaker[Session],
    keys: dict[Role, str],
    world: World,
    settings: Settings,
) -> None:
    claim = claim_headers(settings)
    # The claim's request comes before the operator's decisions on it.
    for endpoint in sorted(mutating(app), key=lambda e: not e.claims):
        # Prepare: the least role the route needs, or the claim
        assert endpoint.role is not None or endpoint.claims
        plaintext = keys[endpoint.role] if endpoint.role is not None else ""
        headers, actor = (
            (claim, "claim:b1") if endpoint.claims else (bearer(plaintext), f"key:{key_id(plaintext)}")
        )
        before = len(audit_rows(sessions))

        # Execute
        expected = CALLS[(endpoint.method, endpoint.path)](client, headers, world)

        # Assert
        assert expected.response.status_code in (200, 201, 202), (endpoint.name, expected.response.text)
        added = audit_rows(sessions)[before:]
        assert [(a.actor, a.action, a.target) for a in added] == [
            (actor, expected.action, expected.target)
        ], endpoint.name


def test_the_audit_entry_carries_the_details(
    client: TestClient, sessions: sessionmaker[Session], operator: dict[str, str], world: World
) -> None:
    # Execute
    provision_device(client, operator, world)
    revoke_device(client, operator, world)
    revoke_device(client, operator, world)
    decide_model("reject", lambda w: w.candidates[0])(client, operator, world)

    # Assert
    details = [(a.action, a.detail) for a in audit_rows(sessions)]
    assert details == [
        ("device.provision", {"cohort": "kitchen"}),
        ("device.revoke", {"again": False}),
        ("device.revoke", {"again": True}),
        ("model.reject", {"reason": "reject in a test"}),
    ]


def test_admins_read_the_audit_log_newest_first_with_filters(
    client: TestClient, keys: dict[Role, str], admin: dict[str, str], world: World
) -> None:
    # Prepare
    operator = bearer(keys[Role.operator])
    create_cohort(client, operator, world)
    revoke_device(client, operator, world)
    create_key(client, admin, world)

    # Execute
    everything = client.get("/api/v1/audit", headers=admin)
    by_operator = client.get(
        "/api/v1/audit", params={"actor": f"key:{key_id(keys[Role.operator])}"}, headers=admin
    )
    by_action = client.get("/api/v1/audit", params={"action": "device.revoke", "limit": 1}, headers=admin)
    as_operator = client.get("/api/v1/audit", headers=operator)

    # Assert
    assert [e["action"] for e in everything.json()["items"]] == [
        "apikey.create",
        "device.revoke",
        "cohort.create",
    ]
    assert by_operator.json()["total"] == 2
    assert by_action.json()["items"][0]["target"] == world.device_id
    assert by_action.json()["total"] == 1
    assert as_operator.status_code == 403


def test_a_refused_mutation_writes_no_audit_entry(
    client: TestClient, sessions: sessionmaker[Session], operator: dict[str, str], world: World
) -> None:
    # Execute
    conflict = client.post(f"/api/v1/models/{world.approved}/approve", json={}, headers=operator)
    missing = client.post("/api/v1/devices/cam-nobody/revoke", headers=operator)
    invalid = client.post("/api/v1/cohorts", json={"id": "Not Valid"}, headers=operator)

    # Assert
    assert (conflict.status_code, missing.status_code, invalid.status_code) == (409, 404, 422)
    assert audit_rows(sessions) == []
