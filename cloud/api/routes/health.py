"""Liveness (no credentials, for the process supervisor) and readiness (the database answers)."""

from fastapi import APIRouter
from sqlalchemy.exc import SQLAlchemyError

from cloud.api.deps import ReaderDep, Viewer
from cloud.api.problems import Problem
from cloud.api.schemas import Health, errors
from cloud.registry.db import ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> Health:
    """The process is alive. The only route that needs no credentials."""
    return Health(status="ok")


@router.get("/readyz", responses=errors({503: "the database is unreachable"}))
async def readyz(reader: ReaderDep, _: Viewer) -> Health:
    """The API can serve: its database answers a query."""
    try:
        await reader.run_sync(ping)
    except SQLAlchemyError as exc:
        raise Problem(503, "Service Unavailable", f"database unreachable: {type(exc).__name__}") from None
    return Health(status="ready")
