"""The audit log: who changed what, newest first (admins only)."""

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy import Select, select

from cloud.api.deps import Admin, PageQuery, ReaderDep
from cloud.api.schemas import Output, Page
from cloud.registry.common import paginate
from cloud.registry.tables import AuditLog

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


class AuditPublic(Output):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


class AuditFilter(PageQuery):
    actor: str | None = Field(None, max_length=160)
    action: str | None = Field(None, max_length=64)
    target: str | None = Field(None, max_length=160)


@router.get("")
async def list_(reader: ReaderDep, _: Admin, query: Annotated[AuditFilter, Query()]) -> Page[AuditPublic]:
    """List audit entries, newest first, filtered by actor, action or target."""
    statement: Select[AuditLog] = select(AuditLog).order_by(AuditLog.id.desc())
    for column, value in (
        (AuditLog.actor, query.actor),
        (AuditLog.action, query.action),
        (AuditLog.target, query.target),
    ):
        if value is not None:
            statement = statement.where(column == value)
    rows, total = await reader.run_sync(paginate, statement, limit=query.limit, offset=query.offset)
    return Page.of(AuditPublic, rows, total, limit=query.limit, offset=query.offset)
