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


def test_a_finished_cycle_job_shows_every_candidate_it_tried(
    client: TestClient, session: Session, viewer: dict[str, str]
) -> None:
    # Prepare: a cycle whose every candidate's int8 export gave up, as the pipeline records it
    make_cohort(session)
    job = jobs.create_job(session, type="rd_cycle", cohort_id="kitchen")
    jobs.claim(session, job.id, owner="worker-a", lease_s=60)
    attempt = {"method": "qat", "float_acc": 0.91, "int8_acc": 0.85, "accepted": False, "seconds": 0.2}
    candidates = [
        {
            "recipe": recipe,
            "status": "export-failed",
            "reason": "int8 export gave up after 1 attempts (limit 0.01)",
            "agreement": None,
            "changed_samples": 0,
            "untouched_drop": None,
            "seconds": 3.5,
            "export": [attempt],
        }
        for recipe in ("default", "unanchored")
    ]
    reason = "every candidate's int8 export gave up"
    result = {"outcome": "rejected", "reason": reason, "candidates": candidates}
    jobs.finish(session, job.id, state=JobState.succeeded, result=result, owner="worker-a")
    session.commit()

    # Execute
    one = client.get(f"/api/v1/jobs/{job.id}", headers=viewer)
    listed = client.get("/api/v1/jobs", params={"cohort_id": "kitchen"}, headers=viewer)

    # Assert
    assert one.status_code == 200, one.text
    assert one.json()["result"] == result
    assert listed.status_code == 200, listed.text
    assert [j["result"]["candidates"] for j in listed.json()["items"]] == [candidates]


def test_a_running_cycle_is_cancelled_and_retried_as_a_new_queued_job(
    client: TestClient, session: Session, settings: Settings, operator: dict[str, str]
) -> None:
    # Prepare: a cycle some worker runs, with a rollout plan
    make_cohort(session)
    running = jobs.create_job(
        session, type="rd_cycle", cohort_id="kitchen", params={"rollout": {"canary": 2}}
    )
    jobs.claim(session, running.id, owner="worker-a", lease_s=60)
    session.commit()

    # Execute
    cancelled = client.post(
        f"/api/v1/jobs/{running.id}/cancel", json={"reason": "wrong data"}, headers=operator
    )
    again = client.post(f"/api/v1/jobs/{running.id}/cancel", headers=operator)
    retried = client.post(f"/api/v1/jobs/{running.id}/retry", headers=operator)
    twice = client.post(f"/api/v1/jobs/{running.id}/retry", headers=operator)

    # Assert: the worker can no longer renew or finish it; the retry is a new job with the same plan
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["error"].endswith(": wrong data")
    assert again.status_code == 409
    session.expire_all()
    assert not jobs.renew(session, running.id, owner="worker-a", lease_s=60)
    assert retried.status_code == 202, retried.text
    new = jobs.get_job(session, uuid.UUID(retried.json()["id"]))
    assert new.params["retry_of"] == str(running.id) and new.params["rollout"] == {"canary": 2}
    assert queued_jobs(settings) == [str(new.id)]
    assert twice.status_code == 409 and str(new.id) in twice.json()["detail"]  # the cohort's open job
    actions = {a.action for a in session.query(AuditLog).filter(AuditLog.action.like("job.%"))}
    assert actions == {"job.cancel", "job.retry"}


@pytest.mark.parametrize("state", [JobState.pending, JobState.succeeded])
def test_only_a_failed_or_cancelled_cycle_is_retried(
    client: TestClient, session: Session, operator: dict[str, str], viewer: dict[str, str], state: JobState
) -> None:
    make_cohort(session)
    job = jobs.create_job(session, type="rd_cycle", cohort_id="kitchen")
    if state is JobState.succeeded:
        jobs.finish(session, job.id, state=state)
    session.commit()

    refused = client.post(f"/api/v1/jobs/{job.id}/retry", headers=operator)
    as_viewer = client.post(f"/api/v1/jobs/{job.id}/cancel", headers=viewer)
    unknown = client.post(f"/api/v1/jobs/{uuid.uuid4()}/cancel", headers=operator)

    assert (
        refused.status_code == 409 and "only a failed or cancelled rd_cycle job" in refused.json()["detail"]
    )
    assert as_viewer.status_code == 403
    assert unknown.status_code == 404
