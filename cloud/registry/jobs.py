"""Pipeline jobs: created `pending`, run under a lease by one worker at a time, their progress and
outcome recorded.

A worker claims a job's lease before it works on it and renews it while it runs. A worker that dies
stops renewing; once the lease has run out another worker may claim the job and run it again, and
the dead worker's late writes are refused (every write of a running job names its lease owner).
"""

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, or_, select, update
from sqlalchemy.orm import Session

from cloud.exceptions import ConflictError, NotFoundError
from cloud.registry.common import paginate
from cloud.registry.tables import Job, JobState, utcnow

FINISHED = (JobState.succeeded, JobState.failed, JobState.cancelled)


def create_job(
    session: Session, *, type: str, cohort_id: str | None = None, params: dict[str, Any] | None = None
) -> Job:
    """A new pending job."""
    job = Job(type=type, cohort_id=cohort_id, params=params or {})
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: uuid.UUID, *, for_update: bool = False) -> Job:
    """The job, or NotFoundError; `for_update` locks its row until the transaction ends."""
    job = session.get(Job, job_id, with_for_update=for_update)
    if job is None:
        raise NotFoundError("job", job_id)
    return job


def claim(
    session: Session, job_id: uuid.UUID, *, owner: str, lease_s: float, now: datetime | None = None
) -> Job | None:
    """Take the job's lease for `owner` and mark it running; None if it is finished or another owner's
    lease on it has not run out. One conditional UPDATE, so two workers cannot both take it."""
    now = now or utcnow()
    taken = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.state.in_((JobState.pending, JobState.running)),
            or_(Job.lease_owner.is_(None), Job.lease_owner == owner, Job.lease_until < now),
        )
        .values(
            state=JobState.running,
            lease_owner=owner,
            lease_until=now + timedelta(seconds=lease_s),
            attempts=Job.attempts + 1,
        )
        .execution_options(synchronize_session=False)
    )
    if taken.rowcount == 0:  # type: ignore[attr-defined]
        get_job(session, job_id)  # NotFoundError for a job that does not exist
        return None
    job = get_job(session, job_id)
    session.refresh(job)
    if job.started_at is None:
        job.started_at = now
    return job


def renew(
    session: Session, job_id: uuid.UUID, *, owner: str, lease_s: float, now: datetime | None = None
) -> bool:
    """Extend `owner`'s lease on a running job; False if the lease was lost (the job is another's now)."""
    renewed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.running, Job.lease_owner == owner)
        .values(lease_until=(now or utcnow()) + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return bool(renewed.rowcount)  # type: ignore[attr-defined]


def release(session: Session, job_id: uuid.UUID, *, owner: str) -> None:
    """Give up `owner`'s lease on a running job so a retry may claim it at once."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.running, Job.lease_owner == owner)
        .values(lease_until=None, lease_owner=None)
        .execution_options(synchronize_session=False)
    )


def requeue(session: Session, job_id: uuid.UUID, *, hold_s: float, now: datetime | None = None) -> None:
    """Note that the job's task was sent again: any worker may claim it at once, and it does not
    count as stale for `hold_s` seconds (so it is not sent again while it waits in the queue)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_((JobState.pending, JobState.running)))
        .values(lease_owner=None, lease_until=(now or utcnow()) + timedelta(seconds=hold_s))
        .execution_options(synchronize_session=False)
    )


def stale_jobs(
    session: Session, *, types: Sequence[str], now: datetime | None = None, pending_for: float = 60.0
) -> list[Job]:
    """Jobs of these types (those workers run under leases) nobody works on: running with a lease that
    ran out (their worker died), and pending ones no worker claimed within `pending_for` seconds (their
    task message was lost); a job sent again (`requeue`) is not stale until its hold ends."""
    now = now or utcnow()
    lapsed = or_(Job.lease_until.is_(None), Job.lease_until < now)
    return list(
        session.scalars(
            select(Job)
            .where(
                Job.type.in_(types),
                or_(
                    (Job.state == JobState.running) & lapsed,
                    (Job.state == JobState.pending)
                    & (Job.created_at < now - timedelta(seconds=pending_for))
                    & lapsed,
                ),
            )
            .order_by(Job.created_at)
        )
    )


def open_job(session: Session, *, cohort_id: str, type: str) -> Job | None:
    """The cohort's pending or running job of this type, if any."""
    return session.scalars(
        select(Job)
        .where(
            Job.cohort_id == cohort_id,
            Job.type == type,
            Job.state.in_((JobState.pending, JobState.running)),
        )
        .limit(1)
    ).first()


def _check_owner(job: Job, owner: str | None) -> None:
    if owner is not None and job.lease_owner != owner:
        raise ConflictError(f"job {job.id} is no longer leased to {owner} (held by {job.lease_owner})")


def report_progress(
    session: Session, job_id: uuid.UUID, *, progress: float, stage: str, owner: str | None = None
) -> Job:
    """Record how far a running job got (0..1) and the stage it is in; with `owner`, only while that
    worker still holds the lease."""
    job = get_job(session, job_id)
    if job.state in FINISHED:
        raise ConflictError(f"job {job_id} is {job.state.value}")
    _check_owner(job, owner)
    if job.state is JobState.pending:
        job.state = JobState.running
        job.started_at = utcnow()
    job.progress = min(1.0, max(job.progress, progress))
    job.stage = stage
    return job


def finish(
    session: Session,
    job_id: uuid.UUID,
    *,
    state: JobState,
    result: dict[str, Any] | None = None,
    error: str = "",
    owner: str | None = None,
) -> Job:
    """Record a job's outcome; with `owner`, only while that worker still holds the lease."""
    if state not in FINISHED:
        raise ValueError(f"{state} is not a final state")
    job = get_job(session, job_id, for_update=True)
    if job.state in FINISHED:
        raise ConflictError(f"job {job_id} is already {job.state.value}")
    _check_owner(job, owner)
    job.lease_owner = None
    job.lease_until = None
    job.state = state
    job.result = result or {}
    job.error = error
    job.finished_at = utcnow()
    if state is JobState.succeeded:
        job.progress = 1.0
    return job


def cancel(session: Session, job_id: uuid.UUID, *, reason: str, now: datetime | None = None) -> Job:
    """Cancel a pending or running job (ConflictError for a finished one). A running job's worker
    finds out when it next renews its lease, and registers nothing: a cycle's knowledge stays
    received, for the next one."""
    job = get_job(session, job_id, for_update=True)
    if job.state in FINISHED:
        raise ConflictError(f"job {job_id} is already {job.state.value}")
    job.state = JobState.cancelled
    job.lease_owner = None
    job.lease_until = None
    job.error = reason[:2000]
    job.finished_at = now or utcnow()
    return job


def list_jobs(
    session: Session,
    *,
    limit: int,
    offset: int,
    cohort_id: str | None = None,
    state: JobState | None = None,
    type: str | None = None,
) -> tuple[Sequence[Job], int]:
    """A page of jobs, newest first, filtered, with the total."""
    statement: Select[Job] = select(Job).order_by(Job.created_at.desc(), Job.id)
    if cohort_id is not None:
        statement = statement.where(Job.cohort_id == cohort_id)
    if state is not None:
        statement = statement.where(Job.state == state)
    if type is not None:
        statement = statement.where(Job.type == type)
    return paginate(session, statement, limit=limit, offset=offset)
