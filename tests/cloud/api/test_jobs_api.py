"""Triggering an RD cycle through the API: the job is stored, then queued for the workers."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kombu import Connection
from sqlalchemy.orm import Session

from cloud.registry import jobs
from cloud.registry.tables import AuditLog, JobState
from cloud.settings import Settings
from cloud.worker.app import QUEUE
from tests.cloud.factories import make_cohort


def queued_jobs(settings: Settings) -> list[str]:
    """The job ids of the run_job messages waiting in the settings' queue (taken off it)."""
    found: list[str] = []
    with Connection(settings.resolved_queue_url) as connection:
        simple: Any = connection  # SimpleQueue is missing from some versions of kombu's stubs
        queue = simple.SimpleQueue(QUEUE)
        try:
            while True:
                try:
                    message = queue.get(timeout=0.5)
                except queue.Empty:
                    return found
                assert message.headers["task"] == "diredi.run_job"
                args, _, _ = message.payload
                found.extend(args)
                message.ack()
        finally:
            queue.close()


def test_an_operator_starts_a_cycle_and_the_job_is_queued(
    client: TestClient, session: Session, settings: Settings, operator: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()

    # Execute
    reply = client.post(
        "/api/v1/jobs",
        json={"type": "rd_cycle", "cohort_id": "kitchen", "rollout": {"canary": 2}},
        headers=operator,
    )

    # Assert
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert (body["type"], body["cohort_id"], body["state"], body["progress"]) == (
        "rd_cycle",
        "kitchen",
        "pending",
        0.0,
    )
    job = jobs.get_job(session, uuid.UUID(body["id"]))
    assert job.params["rollout"]["canary"] == 2 and job.params["trigger"].startswith("api ")
    assert queued_jobs(settings) == [body["id"]]
    assert session.query(AuditLog).filter_by(action="job.trigger", target=body["id"]).count() == 1


def test_a_cohort_runs_one_cycle_at_a_time(
    client: TestClient, session: Session, operator: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    running = jobs.create_job(session, type="rd_cycle", cohort_id="kitchen")
    jobs.claim(session, running.id, owner="worker-a", lease_s=60)
    session.commit()

    # Execute
    reply = client.post("/api/v1/jobs", json={"type": "rd_cycle", "cohort_id": "kitchen"}, headers=operator)

    # Assert
    assert reply.status_code == 409
    assert reply.headers["content-type"] == "application/problem+json"
    assert str(running.id) in reply.json()["detail"]
    session.expire_all()
    assert jobs.get_job(session, running.id).state is JobState.running


def test_a_viewer_cannot_start_a_job_and_an_unknown_cohort_is_404(
    client: TestClient, session: Session, viewer: dict[str, str], operator: dict[str, str]
) -> None:
    body = {"type": "rd_cycle", "cohort_id": "kitchen"}
    assert client.post("/api/v1/jobs", json=body, headers=viewer).status_code == 403
    assert client.post("/api/v1/jobs", json=body, headers=operator).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"type": "retrain", "cohort_id": "kitchen"},
        {"cohort_id": "kitchen"},
        {"type": "rd_cycle"},
        {"type": "rd_cycle", "cohort_id": ""},
        {"type": "rd_cycle", "cohort_id": "k" * 64},
        {"type": "rd_cycle", "cohort_id": "\u00003"},
        {"type": "rd_cycle", "cohort_id": "kitchen/../porch"},
        {"type": "rd_cycle", "cohort_id": "kitchen", "priority": 9},
        {"type": "rd_cycle", "cohort_id": "kitchen", "rollout": {"canary": -1}},
        {"type": "rd_cycle", "cohort_id": "kitchen", "rollout": "fast"},
        ["rd_cycle", "kitchen"],
        "rd_cycle",
    ],
)
def test_a_bad_job_request_is_refused_and_nothing_is_stored(
    client: TestClient, session: Session, settings: Settings, operator: dict[str, str], body: Any
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()

    # Execute
    reply = client.post("/api/v1/jobs", json=body, headers=operator)

    # Assert
    assert reply.status_code == 422, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    assert jobs.list_jobs(session, limit=10, offset=0)[1] == 0
    assert queued_jobs(settings) == []
