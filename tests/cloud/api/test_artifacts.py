"""Artifact downloads: a device gets only what is offered to it, operators get any, bad names get 4xx."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.artifacts import LocalArtifactStore
from cloud.registry.models import decide
from cloud.registry.rollouts import create_rollout
from cloud.registry.tables import Device, Model, RolloutTarget, TargetState
from tests.cloud.api.conftest import basic
from tests.cloud.api.inventory import Reply
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model

UNKNOWN = "0123456789abcdef" * 4


@dataclass
class Fleet:
    """Two devices of one cohort and the models offered to them."""

    a: dict[str, str]  # device cam-a's Basic credentials
    b: dict[str, str]
    teacher: Model  # a cloud model, offered to no device
    desired: Model  # cam-a's desired model
    rolled_out: Model  # offered to cam-a by a rollout
    only_b: Model  # cam-b's desired model


@pytest.fixture
def fleet(session: Session, store: LocalArtifactStore) -> Fleet:
    make_cohort(session)
    a, secret_a = make_device(session, "cam-a")
    b, secret_b = make_device(session, "cam-b")
    teacher = make_cloud_model(session, store)
    desired = make_edge_model(session, store, teacher_id=teacher.id)
    rolled_out = make_edge_model(session, store, teacher_id=teacher.id)
    only_b = make_edge_model(session, store, teacher_id=teacher.id)
    decide(session, rolled_out.id, approve=True)
    create_rollout(session, model_id=rolled_out.id, waves=[["cam-a"]], created_by="test")
    a.desired_model_id = desired.id
    b.desired_model_id = only_b.id
    session.commit()
    return Fleet(basic("cam-a", secret_a), basic("cam-b", secret_b), teacher, desired, rolled_out, only_b)


def download(client: TestClient, sha256: str, headers: dict[str, str]) -> Reply:
    return client.get(f"/api/v1/artifacts/{sha256}", headers=headers)


def assert_served(response: Reply, store: LocalArtifactStore, sha256: str) -> None:
    stored = store.get(sha256)
    assert response.status_code == 200
    assert response.content == stored
    assert response.headers["content-length"] == str(len(stored))
    assert response.headers["etag"] == f'"{sha256}"'
    assert response.headers["content-type"] == "application/octet-stream"


def test_a_device_downloads_its_desired_model(
    client: TestClient, store: LocalArtifactStore, fleet: Fleet
) -> None:
    # Execute
    response = download(client, fleet.desired.sha256, fleet.a)

    # Assert
    assert_served(response, store, fleet.desired.sha256)
    assert fleet.desired.id in response.headers["content-disposition"]


def test_a_device_downloads_a_model_a_rollout_offers_it(
    client: TestClient, store: LocalArtifactStore, fleet: Fleet
) -> None:
    # Execute
    response = download(client, fleet.rolled_out.sha256, fleet.a)

    # Assert
    assert_served(response, store, fleet.rolled_out.sha256)


def test_a_device_downloads_the_model_it_reports(
    client: TestClient, store: LocalArtifactStore, session: Session, fleet: Fleet
) -> None:
    # Prepare
    session.get_one(Device, "cam-a").reported_model_id = fleet.only_b.id
    session.commit()

    # Execute
    response = download(client, fleet.only_b.sha256, fleet.a)

    # Assert
    assert_served(response, store, fleet.only_b.sha256)


def test_what_a_device_reports_opens_only_edge_models_of_its_own_cohort(
    client: TestClient, store: LocalArtifactStore, session: Session, fleet: Fleet
) -> None:
    # Prepare: the reported model comes from the device, so it must not open the teacher or another line
    other_teacher = make_cloud_model(session, store, cohort_id=make_cohort(session, "garden"))
    other_edge = make_edge_model(session, store, teacher_id=other_teacher.id, cohort_id="garden")
    session.commit()
    replies = []

    # Execute
    for model in (fleet.teacher, other_edge):
        session.get_one(Device, "cam-a").reported_model_id = model.id
        session.commit()
        replies.append(download(client, model.sha256, fleet.a))

    # Assert
    assert [r.status_code for r in replies] == [404, 404]


def test_a_device_cannot_download_another_devices_model(
    client: TestClient, store: LocalArtifactStore, fleet: Fleet
) -> None:
    # Execute
    refused = download(client, fleet.only_b.sha256, fleet.a)
    served = download(client, fleet.only_b.sha256, fleet.b)

    # Assert
    assert refused.status_code == 404
    assert refused.headers["content-type"] == "application/problem+json"
    assert_served(served, store, fleet.only_b.sha256)


def test_a_device_cannot_download_a_model_offered_to_nobody(client: TestClient, fleet: Fleet) -> None:
    # Execute
    response = download(client, fleet.teacher.sha256, fleet.a)

    # Assert
    assert response.status_code == 404


def test_a_rolled_back_target_is_no_longer_offered(
    client: TestClient, session: Session, fleet: Fleet
) -> None:
    # Prepare
    target = session.scalars(select(RolloutTarget).where(RolloutTarget.device_id == "cam-a")).one()
    target.state = TargetState.rolled_back
    session.commit()

    # Execute
    response = download(client, fleet.rolled_out.sha256, fleet.a)

    # Assert
    assert response.status_code == 404


def test_a_device_cannot_tell_unknown_artifacts_from_withheld_ones(client: TestClient, fleet: Fleet) -> None:
    # Execute
    unknown = download(client, UNKNOWN, fleet.a)
    withheld = download(client, fleet.only_b.sha256, fleet.a)

    # Assert
    assert unknown.status_code == withheld.status_code == 404
    assert unknown.json()["detail"].replace(UNKNOWN, "X") == withheld.json()["detail"].replace(
        fleet.only_b.sha256, "X"
    )


@pytest.mark.parametrize("role", ["operator", "admin"])
def test_operators_download_any_stored_artifact(
    client: TestClient, store: LocalArtifactStore, fleet: Fleet, request: pytest.FixtureRequest, role: str
) -> None:
    # Prepare
    headers: dict[str, str] = request.getfixturevalue(role)

    # Execute
    responses = {m.id: download(client, m.sha256, headers) for m in (fleet.teacher, fleet.only_b)}

    # Assert
    assert_served(responses[fleet.teacher.id], store, fleet.teacher.sha256)
    assert_served(responses[fleet.only_b.id], store, fleet.only_b.sha256)


def test_a_viewer_cannot_download_artifacts(client: TestClient, fleet: Fleet, viewer: dict[str, str]) -> None:
    # Execute
    response = download(client, fleet.teacher.sha256, viewer)

    # Assert
    assert response.status_code == 403


def test_an_unknown_artifact_is_404_for_operators(client: TestClient, operator: dict[str, str]) -> None:
    # Execute
    response = download(client, UNKNOWN, operator)

    # Assert
    assert response.status_code == 404
    assert UNKNOWN in response.json()["detail"]


def test_a_registered_artifact_missing_from_the_store_is_404(
    client: TestClient, store: LocalArtifactStore, fleet: Fleet, operator: dict[str, str]
) -> None:
    # Prepare
    sha256 = fleet.desired.sha256
    (store.root / sha256[:2] / sha256).unlink()

    # Execute
    by_device = download(client, sha256, fleet.a)
    by_operator = download(client, sha256, operator)

    # Assert
    assert by_device.status_code == by_operator.status_code == 404


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("AB" * 32, 422),  # uppercase hex is not an address
        ("ab" * 31, 422),  # too short
        ("ab" * 33, 422),  # too long
        ("zz" * 32, 422),  # not hex
        ("%2e%2e", 422),  # `..`, encoded
        ("ab" * 32 + "%00", 400),  # a NUL after a valid address: refused at the door
        ("ab" * 31 + "%2f", 422),  # the router drops the trailing slash: 62 digits remain
        # An encoded slash becomes a real one before routing, so no artifact route matches at all.
        ("%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404),
        ("..%2f..%2fetc%2fpasswd", 404),
    ],
)
def test_names_that_are_not_a_sha256_are_refused(
    client: TestClient, fleet: Fleet, operator: dict[str, str], name: str, status: int
) -> None:
    # Execute
    by_operator = client.get(f"/api/v1/artifacts/{name}", headers=operator)
    by_device = client.get(f"/api/v1/artifacts/{name}", headers=fleet.a)

    # Assert
    for response in (by_operator, by_device):
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
    if status == 422:
        assert "sha256" in by_operator.json()["detail"]
