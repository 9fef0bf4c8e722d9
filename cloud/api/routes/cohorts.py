"""Cohorts: the model lines devices belong to."""

from typing import Annotated

from fastapi import APIRouter, Query

from cloud.api.deps import Operator, PageQuery, ReaderDep, SessionDep, Viewer
from cloud.api.schemas import CohortCreate, CohortPublic, Page, errors
from cloud.registry import audit
from cloud.registry.devices import create_cohort, get_cohort, list_cohorts

router = APIRouter(prefix="/api/v1/cohorts", tags=["cohorts"])


@router.get("")
async def list_(reader: ReaderDep, _: Viewer, page: Annotated[PageQuery, Query()]) -> Page[CohortPublic]:
    """List cohorts by id."""
    rows, total = await reader.run_sync(list_cohorts, limit=page.limit, offset=page.offset)
    return Page.of(CohortPublic, rows, total, limit=page.limit, offset=page.offset)


@router.post("", status_code=201, responses=errors({409: "a cohort with this id exists"}))
def create(body: CohortCreate, session: SessionDep, caller: Operator) -> CohortPublic:
    """Create a cohort (a model line)."""
    cohort = create_cohort(session, cohort_id=body.id, description=body.description)
    audit.record(session, actor=caller.actor, action="cohort.create", target=body.id)
    session.commit()
    return CohortPublic.model_validate(cohort)


@router.get("/{cohort_id}", responses=errors({404: "no such cohort"}))
async def get(cohort_id: str, reader: ReaderDep, _: Viewer) -> CohortPublic:
    """One cohort."""
    return CohortPublic.model_validate(await reader.run_sync(get_cohort, cohort_id))
