"""Registry jobs: pending → running with progress → one final state, and listing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from cloud.exceptions import ConflictError, NotFoundError
from cloud.registry import jobs
from cloud.registry.tables import JobState
from tests.cloud.factories import make_cohort


def test_a_new_job_is_pending(session: Session) -> None:
    # Prepare
    make_cohort(session)

    # Execute
    job = jobs.create_job(session, type="rd_update", cohort_id="kitchen", params={"reports": 2})

    # Assert
    assert job.state is JobState.pending
    assert (job.progress, job.stage, job.params) == (0.0, "", {"reports": 2})
    assert job.created_at.tzinfo is not None
    assert job.started_at is None and job.finished_at is None


def test_progress_starts_the_job_and_never_goes_back(session: Session) -> None:
    # Prepare
    job = jobs.create_job(session, type="rd_update")

    # Execute
    jobs.report_progress(session, job.id, progress=0.4, stage="retrain cloud")
    started_at = job.started_at
    jobs.report_progress(session, job.id, progress=0.2, stage="distill edge")
    jobs.report_progress(session, job.id, progress=7.0, stage="export")

    # Assert
    assert job.state is JobState.running
    assert started_at is not None
    assert job.started_at == started_at
    assert job.progress == 1.0
    assert job.stage == "export"


def test_success_completes_the_progress(session: Session) -> None:
    # Prepare
    job = jobs.create_job(session, type="rd_update")
    jobs.report_progress(session, job.id, progress=0.5, stage="gate")

    # Execute
    jobs.finish(session, job.id, state=JobState.succeeded, result={"model_id": "kitchen.v2"})
    session.commit()
    session.expire_all()
    stored = jobs.get_job(session, job.id)

    # Assert
    assert stored.state is JobState.succeeded
    assert stored.progress == 1.0
    assert stored.result == {"model_id": "kitchen.v2"}
    assert stored.finished_at is not None and stored.finished_at.tzinfo is not None


def test_failure_keeps_the_error_and_progress(session: Session) -> None:
    # Prepare
    job = jobs.create_job(session, type="rd_update")
    jobs.report_progress(session, job.id, progress=0.3, stage="export")

    # Execute
    jobs.finish(session, job.id, state=JobState.failed, error="int8 accuracy fell 2.1 points")

    # Assert
    assert (job.state, job.progress, job.error) == (JobState.failed, 0.3, "int8 accuracy fell 2.1 points")


@pytest.mark.parametrize("final", [JobState.succeeded, JobState.failed, JobState.cancelled])
def test_a_finished_job_takes_no_more_progress_or_outcome(session: Session, final: JobState) -> None:
    # Prepare
    job = jobs.create_job(session, type="rd_update")
    jobs.finish(session, job.id, state=final)

    # Execute / Assert
    with pytest.raises(ConflictError):
        jobs.report_progress(session, job.id, progress=0.9, stage="late")
    with pytest.raises(ConflictError):
        jobs.finish(session, job.id, state=JobState.succeeded)
    assert job.state is final


@pytest.mark.parametrize("state", [JobState.pending, JobState.running])
def test_finish_needs_a_final_state(session: Session, state: JobState) -> None:
    # Prepare
    job = jobs.create_job(session, type="rd_update")

    # Execute / Assert
    with pytest.raises(ValueError, match="not a final state"):
        jobs.finish(session, job.id, state=state)
    assert job.state is JobState.pending


def test_an_unknown_job_is_not_found(session: Session) -> None:
    # Execute / Assert
    with pytest.raises(NotFoundError):
        jobs.get_job(session, uuid.uuid4())
    with pytest.raises(NotFoundError):
        jobs.report_progress(session, uuid.uuid4(), progress=0.1, stage="x")
    with pytest.raises(NotFoundError):
        jobs.finish(session, uuid.uuid4(), state=JobState.failed)


def test_list_jobs_filters_with_totals(session: Session) -> None:
    # Prepare
    make_cohort(session)
    first = jobs.create_job(session, type="rd_update", cohort_id="kitchen")
    second = jobs.create_job(session, type="export", cohort_id="kitchen")
    other = jobs.create_job(session, type="rd_update")
    jobs.finish(session, second.id, state=JobState.failed)
    session.commit()

    # Execute
    kitchen, kitchen_total = jobs.list_jobs(session, limit=10, offset=0, cohort_id="kitchen")
    failed, _ = jobs.list_jobs(session, limit=10, offset=0, state=JobState.failed)
    rd, rd_total = jobs.list_jobs(session, limit=1, offset=0, type="rd_update")

    # Assert
    assert {j.id for j in kitchen} == {first.id, second.id} and kitchen_total == 2
    assert [j.id for j in failed] == [second.id]
    assert len(rd) == 1 and rd[0].id in {first.id, other.id} and rd_total == 2


# Leases ----------------------------------------------------------------------------------------------


def test_one_owner_at_a_time_holds_a_job_until_its_lease_runs_out(session: Session) -> None:
    # Prepare
    job = jobs.create_job(session, type="rd_cycle")
    now = datetime.now(UTC)

    # Execute
    first = jobs.claim(session, job.id, owner="worker-a", lease_s=60, now=now)
    while_held = jobs.claim(session, job.id, owner="worker-b", lease_s=60, now=now + timedelta(seconds=59))
    after_expiry = jobs.claim(session, job.id, owner="worker-b", lease_s=60, now=now + timedelta(seconds=61))

    # Assert
    assert first is not None and while_held is None and after_expiry is not None
    assert (after_expiry.state, after_expiry.lease_owner, after_expiry.attempts) == (
        JobState.running,
        "worker-b",
        2,
    )
    assert after_expiry.started_at == now


def test_a_worker_that_lost_its_lease_can_neither_renew_report_nor_finish(session: Session) -> None:
    # Prepare
    job = jobs.create_job(session, type="rd_cycle")
    now = datetime.now(UTC)
    jobs.claim(session, job.id, owner="worker-a", lease_s=60, now=now)
    jobs.claim(session, job.id, owner="worker-b", lease_s=60, now=now + timedelta(seconds=90))

    # Execute / Assert
    assert not jobs.renew(session, job.id, owner="worker-a", lease_s=60)
    with pytest.raises(ConflictError, match="no longer leased to worker-a"):
        jobs.report_progress(session, job.id, progress=0.5, stage="re-KD", owner="worker-a")
    with pytest.raises(ConflictError, match="no longer leased to worker-a"):
        jobs.finish(session, job.id, state=JobState.succeeded, owner="worker-a")
    assert jobs.renew(session, job.id, owner="worker-b", lease_s=60)
    finished = jobs.finish(session, job.id, state=JobState.succeeded, owner="worker-b")
    assert (finished.state, finished.lease_owner, finished.lease_until) == (JobState.succeeded, None, None)


def test_a_finished_job_cannot_be_claimed(session: Session) -> None:
    # Prepare
    job = jobs.create_job(session, type="rd_cycle")
    jobs.claim(session, job.id, owner="worker-a", lease_s=60)
    jobs.finish(session, job.id, state=JobState.failed, error="boom", owner="worker-a")

    # Execute / Assert
    assert jobs.claim(session, job.id, owner="worker-a", lease_s=60) is None
    with pytest.raises(NotFoundError):
        jobs.claim(session, uuid.uuid4(), owner="worker-a", lease_s=60)


def test_stale_jobs_are_expired_leases_and_long_unclaimed_pending_ones(session: Session) -> None:
    # Prepare
    now = datetime.now(UTC)
    dead = jobs.create_job(session, type="rd_cycle")
    alive = jobs.create_job(session, type="rd_cycle")
    fresh = jobs.create_job(session, type="rd_cycle")
    forgotten = jobs.create_job(session, type="rd_cycle")
    forgotten.created_at = now - timedelta(minutes=5)
    released = jobs.create_job(session, type="rd_cycle")
    elsewhere = jobs.create_job(session, type="bootstrap")  # run by the CLI, under no lease
    jobs.report_progress(session, elsewhere.id, progress=0.5, stage="train")
    jobs.claim(session, dead.id, owner="w1", lease_s=60, now=now - timedelta(seconds=120))
    jobs.claim(session, alive.id, owner="w2", lease_s=60, now=now)
    jobs.claim(session, released.id, owner="w3", lease_s=60, now=now)
    jobs.release(session, released.id, owner="w3")
    session.flush()

    # Execute
    stale = {job.id for job in jobs.stale_jobs(session, types=["rd_cycle"], now=now, pending_for=60)}
    for job_id in stale:
        jobs.requeue(session, job_id, hold_s=30, now=now)
    held = {
        job.id
        for job in jobs.stale_jobs(
            session, types=["rd_cycle"], now=now + timedelta(seconds=29), pending_for=60
        )
    }
    after_hold = {
        job.id
        for job in jobs.stale_jobs(
            session, types=["rd_cycle"], now=now + timedelta(seconds=31), pending_for=60
        )
    }

    # Assert
    assert stale == {dead.id, forgotten.id, released.id}
    assert fresh.id not in stale and alive.id not in stale
    assert held == set() and after_hold == stale
    taken = jobs.claim(session, dead.id, owner="w4", lease_s=60, now=now + timedelta(seconds=1))
    assert taken is not None and taken.lease_owner == "w4"  # a requeued job is claimed at once


def test_the_open_job_of_a_cohort(session: Session) -> None:
    # Prepare
    make_cohort(session)
    done = jobs.create_job(session, type="rd_cycle", cohort_id="kitchen")
    jobs.finish(session, done.id, state=JobState.succeeded)
    assert jobs.open_job(session, cohort_id="kitchen", type="rd_cycle") is None

    # Execute
    job = jobs.create_job(session, type="rd_cycle", cohort_id="kitchen")

    # Assert
    assert jobs.open_job(session, cohort_id="kitchen", type="rd_cycle") is job
    assert jobs.open_job(session, cohort_id="kitchen", type="bootstrap") is None
