"""Rollouts through the API: start (with a plan or the defaults), pause, resume, roll back — each
audited, with problem+json for what cannot be done and for garbage bodies; the engine carries them out."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.pipeline.rollouts import advance_rollouts
from cloud.registry.tables import AuditLog, RolloutState
from tests.cloud.factories import make_cohort, make_device
from tests.cloud.pipeline.rollout_fleet import T0, Fleet, RecordingPublisher, Sent, kitchen_fleet
from wire.messages import AckResult

ROLLOUTS = "/api/v1/rollouts"
CAMS = ["cam-a", "cam-b", "cam-c"]


@pytest.fixture
def fleet(session: Session, store: LocalArtifactStore) -> Fleet:
    return kitchen_fleet(session, store, CAMS)


def audits(sessions: sessionmaker[Session]) -> list[tuple[str, str, str]]:
    with sessions() as session:
        rows = session.scalars(select(AuditLog).order_by(AuditLog.id))
        return [(a.actor.split(":")[0], a.action, a.target) for a in rows]


def test_an_operator_starts_a_rollout_with_a_plan_and_the_engine_offers_the_canary(
    client: TestClient, operator: dict[str, str], sessions: sessionmaker[Session], fleet: Fleet
) -> None:
    # Prepare
    plan = {"canary": 1, "waves": [0.5, 1], "observe_s": 30, "confidence_drop": 0.05}

    # Execute
    response = client.post(ROLLOUTS, json={"model_id": fleet.v2, "plan": plan}, headers=operator)
    publisher = RecordingPublisher()
    advance_rollouts(sessions, publisher, now=T0)
    read = client.get(f"{ROLLOUTS}/{response.json()['id']}", headers=operator).json()

    # Assert
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["model_id"], body["cohort_id"], body["state"]) == (fleet.v2, "kitchen", "pending")
    assert body["created_by"].startswith("key:")
    assert body["targets"]["pending"] == 3
    assert body["waves"]["plan"] | plan == body["waves"]["plan"]
    assert [s["size"] for s in body["waves"]["stages"]] == [1, 1, 1]
    assert publisher.take() == [Sent("cam-a", fleet.v2, None)]
    assert (read["state"], read["targets"]["offered"], read["targets"]["pending"]) == ("running", 1, 2)
    assert audits(sessions) == [("key", "rollout.create", body["id"])]


def test_a_rollout_to_chosen_devices_takes_them_in_order_with_the_default_plan(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], fleet: Fleet
) -> None:
    # Execute
    response = client.post(
        ROLLOUTS, json={"model_id": fleet.v2, "device_ids": ["cam-c", "cam-a"]}, headers=operator
    )
    targets = client.get(f"{ROLLOUTS}/{response.json()['id']}/targets", headers=viewer).json()

    # Assert
    assert response.status_code == 201, response.text
    assert response.json()["waves"]["plan"]["canary"] == 1
    assert [(t["device_id"], t["wave"]) for t in targets["items"]] == [("cam-c", 0), ("cam-a", 1)]


def test_a_rollout_to_a_label_selector_says_so_and_takes_the_matching_devices(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], fleet: Fleet
) -> None:
    # Prepare: cam-b and cam-c are on the roof
    for device_id in ("cam-b", "cam-c"):
        labelled = client.patch(
            f"/api/v1/devices/{device_id}", json={"labels": {"site": "roof"}}, headers=operator
        )
        assert labelled.status_code == 200, labelled.text

    # Execute
    response = client.post(ROLLOUTS, json={"model_id": fleet.v2, "selector": "site=roof"}, headers=operator)
    targets = client.get(f"{ROLLOUTS}/{response.json()['id']}/targets", headers=viewer).json()
    second = client.post(ROLLOUTS, json={"model_id": fleet.v2, "selector": "site=lab"}, headers=operator)

    # Assert
    assert response.status_code == 201, response.text
    assert (response.json()["scope"], response.json()["selector"]) == ("selector", "site=roof")
    assert sorted(t["device_id"] for t in targets["items"]) == ["cam-b", "cam-c"]
    assert second.status_code == 409 and "already has an open rollout" in second.json()["detail"]


def test_a_selector_that_matches_no_device_is_409(
    client: TestClient, operator: dict[str, str], fleet: Fleet
) -> None:
    response = client.post(ROLLOUTS, json={"model_id": fleet.v2, "selector": "site=moon"}, headers=operator)
    assert response.status_code == 409
    assert response.json()["detail"] == "no active device of cohort kitchen matches 'site=moon'"


def test_pause_resume_and_rollback_are_audited_and_carried_out_by_the_engine(
    client: TestClient, operator: dict[str, str], sessions: sessionmaker[Session], fleet: Fleet
) -> None:
    # Prepare: the canary installed
    from tests.cloud.pipeline.rollout_fleet import send_acks

    rollout_id = client.post(ROLLOUTS, json={"model_id": fleet.v2}, headers=operator).json()["id"]
    publisher = RecordingPublisher()
    advance_rollouts(sessions, publisher, now=T0)
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-a")
    publisher.take()

    # Execute
    paused = client.post(f"{ROLLOUTS}/{rollout_id}/pause", json={"reason": "freeze"}, headers=operator)
    paused_again = client.post(f"{ROLLOUTS}/{rollout_id}/pause", headers=operator)
    advance_rollouts(sessions, publisher, now=T0 + timedelta(hours=1))
    offered_while_paused = publisher.take()
    resumed = client.post(f"{ROLLOUTS}/{rollout_id}/resume", headers=operator)
    rolled = client.post(f"{ROLLOUTS}/{rollout_id}/rollback", json={"reason": "bad"}, headers=operator)
    advance_rollouts(sessions, publisher, now=T0 + timedelta(hours=2))
    final = client.get(f"{ROLLOUTS}/{rollout_id}", headers=operator).json()
    rolled_again = client.post(f"{ROLLOUTS}/{rollout_id}/rollback", headers=operator)

    # Assert
    assert (paused.status_code, paused.json()["state"], paused.json()["reason"]) == (200, "paused", "freeze")
    assert paused_again.status_code == 409
    assert paused_again.headers["content-type"] == "application/problem+json"
    assert "only a pending or running one pauses" in paused_again.json()["detail"]
    assert offered_while_paused == []
    assert (resumed.status_code, resumed.json()["state"]) == (200, "running")
    assert (rolled.status_code, rolled.json()["state"]) == (200, "halted")
    assert rolled.json()["reason"].endswith(": bad")
    assert publisher.take() == [Sent("cam-a", fleet.v1, fleet.v2)]
    assert (final["state"], final["targets"]["rolled_back"]) == (RolloutState.rolled_back.value, 1)
    assert rolled_again.status_code == 409
    assert audits(sessions) == [
        ("key", "rollout.create", rollout_id),
        ("key", "rollout.pause", rollout_id),
        ("key", "rollout.resume", rollout_id),
        ("key", "rollout.rollback", rollout_id),
    ]


def test_a_halt_stops_offering_is_audited_and_a_second_one_is_409(
    client: TestClient, operator: dict[str, str], sessions: sessionmaker[Session], fleet: Fleet
) -> None:
    # Prepare: the canary offered
    rollout_id = client.post(ROLLOUTS, json={"model_id": fleet.v2}, headers=operator).json()["id"]
    publisher = RecordingPublisher()
    advance_rollouts(sessions, publisher, now=T0)
    publisher.take()

    # Execute
    halted = client.post(f"{ROLLOUTS}/{rollout_id}/halt", json={"reason": "enough"}, headers=operator)
    advance_rollouts(sessions, publisher, now=T0 + timedelta(hours=1))
    again = client.post(f"{ROLLOUTS}/{rollout_id}/halt", headers=operator)
    listed = client.get(ROLLOUTS, params={"state": "stopped"}, headers=operator).json()

    # Assert
    assert (halted.status_code, halted.json()["state"]) == (200, "stopped")
    assert halted.json()["reason"].endswith(": enough")
    assert publisher.take() == []
    assert again.status_code == 409 and "only an open one is halted" in again.json()["detail"]
    assert [r["id"] for r in listed["items"]] == [rollout_id]
    assert audits(sessions)[-1] == ("key", "rollout.halt", rollout_id)


@pytest.mark.parametrize("action", ["pause", "resume", "halt", "rollback"])
def test_steering_a_rollout_that_does_not_exist_is_404(
    client: TestClient, operator: dict[str, str], action: str
) -> None:
    response = client.post(f"{ROLLOUTS}/{uuid.uuid4()}/{action}", headers=operator)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


def test_what_cannot_be_rolled_out_is_a_problem(
    client: TestClient,
    operator: dict[str, str],
    session: Session,
    sessions: sessionmaker[Session],
    fleet: Fleet,
) -> None:
    # Prepare: a device of another cohort
    make_cohort(session, "garden")
    make_device(session, "gate-1", "garden")
    session.commit()

    # Execute
    missing_model = client.post(ROLLOUTS, json={"model_id": "kitchen.v9"}, headers=operator)
    missing_device = client.post(
        ROLLOUTS, json={"model_id": fleet.v2, "device_ids": ["cam-z"]}, headers=operator
    )
    other_cohort = client.post(
        ROLLOUTS, json={"model_id": fleet.v2, "device_ids": ["gate-1"]}, headers=operator
    )
    first = client.post(ROLLOUTS, json={"model_id": fleet.v2}, headers=operator)
    second = client.post(ROLLOUTS, json={"model_id": fleet.v2}, headers=operator)

    # Assert
    assert [r.status_code for r in (missing_model, missing_device, other_cohort, first, second)] == [
        404,
        404,
        409,
        201,
        409,
    ]
    assert "already has an open rollout" in second.json()["detail"]
    assert [action for _, action, _ in audits(sessions)] == ["rollout.create"]


def test_a_viewer_cannot_start_or_steer_rollouts(
    client: TestClient, viewer: dict[str, str], operator: dict[str, str], fleet: Fleet
) -> None:
    rollout_id = client.post(ROLLOUTS, json={"model_id": fleet.v2}, headers=operator).json()["id"]
    assert client.post(ROLLOUTS, json={"model_id": fleet.v2}, headers=viewer).status_code == 403
    assert client.post(f"{ROLLOUTS}/{rollout_id}/pause", headers=viewer).status_code == 403
    assert client.post(f"{ROLLOUTS}/{rollout_id}/halt", headers=viewer).status_code == 403
    assert client.post(f"{ROLLOUTS}/{rollout_id}/rollback", headers=viewer).status_code == 403
    assert client.post(ROLLOUTS, json={"model_id": fleet.v2}).status_code == 401


GARBAGE: dict[str, tuple[Any, str]] = {
    "not an object": ([1, 2], "body"),
    "no model": ({}, "body.model_id"),
    "model not a string": ({"model_id": 7}, "body.model_id"),
    "model with a slash": ({"model_id": "../etc"}, "body.model_id"),
    "model too long": ({"model_id": "m" * 200}, "body.model_id"),
    "unknown field": ({"model_id": "kitchen.v2", "force": True}, "body.force"),
    "unknown plan field": ({"model_id": "kitchen.v2", "plan": {"halt_failed": 1}}, "body.plan.halt_failed"),
    "plan not an object": ({"model_id": "kitchen.v2", "plan": "fast"}, "body.plan"),
    "fractions not rising": ({"model_id": "kitchen.v2", "plan": {"waves": [0.5, 0.2, 1]}}, "body.plan"),
    "fractions short of 1": ({"model_id": "kitchen.v2", "plan": {"waves": [0.5]}}, "body.plan"),
    "a bool for a count": ({"model_id": "kitchen.v2", "plan": {"canary": True}}, "body.plan.canary"),
    "a string for a number": ({"model_id": "kitchen.v2", "plan": {"observe_s": "60"}}, "body.plan.observe_s"),
    "negative timeout": (
        {"model_id": "kitchen.v2", "plan": {"wave_timeout_s": -1}},
        "body.plan.wave_timeout_s",
    ),
    "fraction above 1": ({"model_id": "kitchen.v2", "plan": {"max_failed_fraction": 2}}, "body.plan"),
    "huge canary": ({"model_id": "kitchen.v2", "plan": {"canary": 10**12}}, "body.plan.canary"),
    "no devices": ({"model_id": "kitchen.v2", "device_ids": []}, "body.device_ids"),
    "bad device id": ({"model_id": "kitchen.v2", "device_ids": ["cam a"]}, "body.device_ids.0"),
    "device NUL": ({"model_id": "kitchen.v2", "device_ids": ["cam\x00"]}, "body"),
    "devices not a list": ({"model_id": "kitchen.v2", "device_ids": "cam-a"}, "body.device_ids"),
    "selector not one": ({"model_id": "kitchen.v2", "selector": "site=a=b"}, "body.selector"),
    "selector empty term": ({"model_id": "kitchen.v2", "selector": "site=a,,b"}, "body.selector"),
    "selector not a string": ({"model_id": "kitchen.v2", "selector": ["site=a"]}, "body.selector"),
    "selector too long": ({"model_id": "kitchen.v2", "selector": "k" * 5000}, "body.selector"),
    "selector and devices": (
        {"model_id": "kitchen.v2", "selector": "site=lab", "device_ids": ["cam-a"]},
        "body",
    ),
}


@pytest.mark.parametrize("case", list(GARBAGE), ids=list(GARBAGE))
def test_garbage_bodies_are_422_problems_and_change_nothing(
    client: TestClient, operator: dict[str, str], sessions: sessionmaker[Session], fleet: Fleet, case: str
) -> None:
    # Prepare
    body, location = GARBAGE[case]

    # Execute
    response = client.post(ROLLOUTS, json=body, headers=operator)

    # Assert
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert any(e["location"].startswith(location) for e in response.json()["errors"]), response.json()
    assert client.get(ROLLOUTS, headers=operator).json()["total"] == 0
    assert audits(sessions) == []


@pytest.mark.parametrize(
    "content", [b"{", b"\xff\xfe", b'{"model_id": "kitchen.v2"} trailing', b"null"], ids=str
)
def test_unparseable_bodies_are_422(
    client: TestClient, operator: dict[str, str], fleet: Fleet, content: bytes
) -> None:
    response = client.post(
        ROLLOUTS, content=content, headers={**operator, "Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text


def test_a_steering_body_is_checked_too(client: TestClient, operator: dict[str, str], fleet: Fleet) -> None:
    rollout_id = client.post(ROLLOUTS, json={"model_id": fleet.v2}, headers=operator).json()["id"]
    for body in ({"reason": "x" * 5000}, {"reason": 3}, {"why": "x"}, [1]):
        response = client.post(f"{ROLLOUTS}/{rollout_id}/pause", json=body, headers=operator)
        assert response.status_code == 422, (body, response.text)
    assert client.post(f"{ROLLOUTS}/not-a-uuid/pause", headers=operator).status_code == 422
    assert client.get(f"{ROLLOUTS}/{rollout_id}", headers=operator).json()["state"] == "pending"
