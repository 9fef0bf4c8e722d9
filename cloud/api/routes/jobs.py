"""Pipeline jobs with their progress, and an operator's trigger of an RD cycle for a cohort."""

import logging
import uuid
from functools import cache
from typing import Annotated, Literal

from celery import Celery
from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.deps import Operator, PageQuery, ReaderDep, ServicesDep, SessionDep, Viewer
from cloud.api.schemas import JobPublic, Page, Slug, errors
from cloud.pipeline.rollout_checks import RolloutPlan
from cloud.pipeline.scheduling import JOB_TYPE, create_cycle_job
from cloud.registry import audit
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
    try:
        _queue(services.settings.resolved_queue_url).send_task("diredi.run_job", args=(str(job.id),))
    except Exception as exc:  # the job is stored: the worker's beat sends it once it has waited too long
        log.warning("job %s stored but not queued (%s); the worker will pick it up", job.id, exc)
    return JobPublic.model_validate(job)


@router.get("/{job_id}", responses=errors({404: "no such job"}))
async def get(job_id: uuid.UUID, reader: ReaderDep, _: Viewer) -> JobPublic:
    """One job, with its progress (0 to 1), stage, result or error."""
    return JobPublic.model_validate(await reader.run_sync(get_job, job_id))
