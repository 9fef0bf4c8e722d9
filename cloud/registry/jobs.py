"""Pipeline jobs: created `pending`, their progress and outcome recorded; the workers come later."""

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, select
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


def get_job(session: Session, job_id: uuid.UUID) -> Job:
    """The job, or NotFoundError."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFoundError("job", job_id)
    return job


def report_progress(session: Session, job_id: uuid.UUID, *, progress: float, stage: str) -> Job:
    """Record how far a running job got (0..1) and the stage it is in."""
    job = get_job(session, job_id)
    if job.state in FINISHED:
        raise ConflictError(f"job {job_id} is {job.state.value}")
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
) -> Job:
    """Record a job's outcome."""
    if state not in FINISHED:
        raise ValueError(f"{state} is not a final state")
    job = get_job(session, job_id)
    if job.state in FINISHED:
        raise ConflictError(f"job {job_id} is already {job.state.value}")
    job.state = state
    job.result = result or {}
    job.error = error
    job.finished_at = utcnow()
    if state is JobState.succeeded:
        job.progress = 1.0
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
