"""Knowledge reports: metadata only. The payloads stay with the pipeline and are never served."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field

from cloud.api.deps import PageQuery, ReaderDep, Viewer
from cloud.api.schemas import KnowledgePublic, Page, errors
from cloud.registry.knowledge import get_report, list_reports
from cloud.registry.tables import KnowledgeStatus

router = APIRouter(prefix="/api/v1/knowledge", tags=["knowledge"])


class KnowledgeFilter(PageQuery):
    device_id: str | None = Field(None, max_length=63)
    cohort_id: str | None = Field(None, max_length=63)
    status: KnowledgeStatus | None = None
    job_id: uuid.UUID | None = None


@router.get("")
async def list_(
    reader: ReaderDep, _: Viewer, query: Annotated[KnowledgeFilter, Query()]
) -> Page[KnowledgePublic]:
    """List knowledge reports, newest first, filtered by device, cohort, status or consuming job."""
    rows, total = await reader.run_sync(
        list_reports,
        limit=query.limit,
        offset=query.offset,
        device_id=query.device_id,
        cohort_id=query.cohort_id,
        status=query.status,
        job_id=query.job_id,
    )
    return Page.of(KnowledgePublic, rows, total, limit=query.limit, offset=query.offset)


@router.get("/{msg_id}", responses=errors({404: "no such report"}))
async def get(msg_id: uuid.UUID, reader: ReaderDep, _: Viewer) -> KnowledgePublic:
    """One report's metadata."""
    return KnowledgePublic.model_validate(await reader.run_sync(get_report, msg_id))
