"""Enrolment by claim at the API: what a claim may ask for, what an operator decides, and the requests
that are refused (garbage CSRs, another device's name, a refused serial, a taken id)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from cloud.fleet_ca import CLAIM_CA_NAME, FleetCA
from cloud.settings import Settings
from device_firmware_py.identity import signing_request
from tests.cloud.api.conftest import FRONT_SECRET
from tests.cloud.factories import make_cohort, make_device

PROBLEM = "application/problem+json"


@pytest.fixture
def claim(settings: Settings) -> dict[str, str]:
    """The headers of a request the front passes on with batch b1's claim certificate."""
    _, issued = FleetCA.open(settings.resolved_claim_ca_dir, name=CLAIM_CA_NAME).issue_claim("b1")
    return {"X-Device-Certificate": quote(issued.pem, safe=""), "X-Diredi-Front": FRONT_SECRET}


def csr(name: str) -> str:
    return signing_request(ec.generate_private_key(ec.SECP256R1()), name)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"serial": "cam-0001", "csr": "garbage"}, "not a PEM certificate signing request"),
        ({"serial": "cam-0001", "csr": csr("cam-0002")}, "names"),
        ({"serial": "diredi-ingest-a", "csr": csr("diredi-ingest-a")}, "not a device id"),
        ({"serial": "a/b", "csr": csr("cam-0001")}, "should match pattern"),
        ({"serial": "cam-0001"}, "Field required"),
    ],
)
def test_a_request_the_ca_would_not_sign_is_refused_and_nothing_is_recorded(
    client: TestClient, claim: dict[str, str], operator: dict[str, str], body: dict[str, str], says: str
) -> None:
    # Execute
    answer = client.post("/api/v1/enrol", json=body, headers=claim)
    listed = client.get("/api/v1/enrolments", headers=operator).json()

    # Assert
    assert answer.status_code == 422 and answer.headers["content-type"] == PROBLEM, answer.text
    assert says in answer.text
    assert listed["total"] == 0


def test_a_refused_serial_stays_refused_and_a_taken_id_cannot_be_pre_registered(
    client: TestClient, claim: dict[str, str], operator: dict[str, str], session: Session
) -> None:
    # Prepare
    make_cohort(session)
    make_device(session, "cam-0009")
    session.commit()
    asked = client.post("/api/v1/enrol", json={"serial": "cam-0001", "csr": csr("cam-0001")}, headers=claim)

    # Execute
    no_cohort = client.post("/api/v1/enrolments/cam-0001/approve", json={}, headers=operator)
    refused = client.post("/api/v1/enrolments/cam-0001/refuse", headers=operator)
    again = client.post("/api/v1/enrol", json={"serial": "cam-0001", "csr": csr("cam-0001")}, headers=claim)
    unknown = client.post("/api/v1/enrolments/cam-0404/approve", json={}, headers=operator)
    taken = client.post(
        "/api/v1/enrolments", json={"serial": "cam-0009", "cohort_id": "kitchen"}, headers=operator
    )
    as_operator = client.post(
        "/api/v1/enrol", json={"serial": "cam-0002", "csr": csr("cam-0002")}, headers=operator
    )

    # Assert
    assert asked.status_code == 202 and asked.json()["state"] == "pending"
    assert no_cohort.status_code == 422 and refused.json()["state"] == "refused"
    assert again.status_code == 403 and unknown.status_code == 404 and taken.status_code == 409
    assert as_operator.status_code == 403  # an operator's key is no claim
