"""Pipeline jobs and their progress; an operator starts an RD cycle, cancels a job, or retries one."""

import logging
import uuid
from functools import cache
from typing import Annotated, Literal

from celery import Celery
from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.deps import Operator, PageQuery, ReaderDep, ServicesDep, SessionDep, Viewer
from cloud.api.schemas import Decision, JobPublic, Page, Slug, errors
from cloud.exceptions import ConflictError
from cloud.pipeline.rollout_checks import RolloutPlan
from cloud.pipeline.scheduling import JOB_TYPE, create_cycle_job
from cloud.registry import audit, jobs
from cloud.registry.devices import get_cohort
from cloud.registry.jobs import get_job, list_jobs
from cloud.registry.tables import JobState

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])
log = logging.getLogger(__name__)


class JobFilter(PageQuery):
    cohort_id: str | None = Field(None, max_length=63)
    state: JobState | None = None
    type: str | None = Field(None, max_length=32)


class JobRequest(BaseModel):
    """A job to run now."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["rd_cycle"] = Field(
        description="rd_cycle: the cohort's received knowledge → RD update → re-KD → int8 → gate"
    )
    cohort_id: Slug
    rollout: RolloutPlan | None = Field(
        None, description="the plan of the rollout an approved model starts (default: the default plan)"
    )


@cache
def _queue(url: str) -> Celery:  # one connection pool per API process
    from cloud.worker.app import make_app

    return make_app(url)


@router.get("")
async def list_(reader: ReaderDep, _: Viewer, query: Annotated[JobFilter, Query()]) -> Page[JobPublic]:
    """List jobs, newest first, filtered by cohort, state or type."""
    rows, total = await reader.run_sync(
        list_jobs,
        limit=query.limit,
        offset=query.offset,
        cohort_id=query.cohort_id,
        state=query.state,
        type=query.type,
    )
    return Page.of(JobPublic, rows, total, limit=query.limit, offset=query.offset)


@router.post(
    "",
    status_code=202,
    responses=errors({404: "no such cohort", 409: "the cohort already has a pending or running job"}),
)
def trigger(body: JobRequest, session: SessionDep, services: ServicesDep, caller: Operator) -> JobPublic:
    """Start an RD cycle of the cohort's received knowledge now, without waiting for the threshold or
    the schedule; follow its progress at GET /api/v1/jobs/{id}."""
    get_cohort(session, body.cohort_id)
    rollout = body.rollout.model_dump(mode="json") if body.rollout else None
    job = create_cycle_job(session, cohort_id=body.cohort_id, trigger=f"api {caller.actor}", rollout=rollout)
    audit.record(session, actor=caller.actor, action="job.trigger", target=str(job.id), type=JOB_TYPE)
    session.commit()
    _send(services, job.id)
    return JobPublic.model_validate(job)


def _send(services: ServicesDep, job_id: uuid.UUID) -> None:
    try:
        _queue(services.settings.resolved_queue_url).send_task("diredi.run_job", args=(str(job_id),))
    except Exception as exc:  # the job is stored: the worker's beat sends it once it has waited too long
        log.warning("job %s stored but not queued (%s); the worker will pick it up", job_id, exc)


@router.post("/{job_id}/cancel", responses=errors({404: "no such job", 409: "the job is finished"}))
def cancel(
    job_id: uuid.UUID, session: SessionDep, caller: Operator, body: Annotated[Decision | None, Body()] = None
) -> JobPublic:
    """Cancel a pending or running job. A running one stops counting at once; its worker finds out at
    its next lease renewal and registers nothing, so the knowledge it took waits for the next cycle."""
    reason = f"cancelled by {caller.actor}" + (f": {body.reason}" if body and body.reason else "")
    job = jobs.cancel(session, job_id, reason=reason)
    audit.record(session, actor=caller.actor, action="job.cancel", target=str(job_id), reason=reason)
    session.commit()
    return JobPublic.model_validate(job)


@router.post(
    "/{job_id}/retry",
    status_code=202,
    responses=errors(
        {
            404: "no such job",
            409: "the job is not a failed or cancelled RD cycle, or its cohort has an open job",
        }
    ),
)
def retry(job_id: uuid.UUID, session: SessionDep, services: ServicesDep, caller: Operator) -> JobPublic:
    """Run a failed or cancelled RD cycle again, as a new job with the same cohort and rollout plan
    (its `params.retry_of` names the old one)."""
    old = get_job(session, job_id)
    if (
        old.type != JOB_TYPE
        or old.state not in (JobState.failed, JobState.cancelled)
        or old.cohort_id is None
    ):
        raise ConflictError(f"job {job_id} is a {old.state.value} {old.type} job: only a failed or cancelled "
                            f"{JOB_TYPE} job can be retried")  # fmt: skip
    job = create_cycle_job(
        session,
        cohort_id=old.cohort_id,
        trigger=f"retry by {caller.actor}",
        rollout=old.params.get("rollout"),
    )
    job.params = {**job.params, "retry_of": str(job_id)}
    audit.record(session, actor=caller.actor, action="job.retry", target=str(job.id), retry_of=str(job_id))
    session.commit()
    _send(services, job.id)
    return JobPublic.model_validate(job)


@router.get("/{job_id}", responses=errors({404: "no such job"}))
async def get(job_id: uuid.UUID, reader: ReaderDep, _: Viewer) -> JobPublic:
    """One job, with its progress (0 to 1), stage, result or error."""
    return JobPublic.model_validate(await reader.run_sync(get_job, job_id))
