"""Pipeline jobs with their progress. (Starting and steering jobs comes with the pipeline.)"""

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field

from cloud.api.deps import PageQuery, ReaderDep, Viewer
from cloud.api.schemas import JobPublic, Page, errors
from cloud.registry.jobs import get_job, list_jobs
from cloud.registry.tables import JobState

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])


class JobFilter(PageQuery):
    cohort_id: str | None = Field(None, max_length=63)
    state: JobState | None = None
    type: str | None = Field(None, max_length=32)


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


@router.get("/{job_id}", responses=errors({404: "no such job"}))
async def get(job_id: uuid.UUID, reader: ReaderDep, _: Viewer) -> JobPublic:
    """One job, with its progress (0 to 1), stage, result or error."""
    return JobPublic.model_validate(await reader.run_sync(get_job, job_id))
