"""Liveness (no credentials, for the process supervisor) and readiness (the database answers)."""

from fastapi import APIRouter
from sqlalchemy.exc import SQLAlchemyError

from cloud.api.deps import ReadSessionDep, Viewer
from cloud.api.problems import Problem
from cloud.api.schemas import Health, errors
from cloud.registry.db import ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> Health:
    """The process is alive. The only route that needs no credentials."""
    return Health(status="ok")


@router.get("/readyz", responses=errors({503: "the database is unreachable"}))
def readyz(session: ReadSessionDep, _: Viewer) -> Health:
    """The API can serve: its database answers a query."""
    try:
        ping(session)
    except SQLAlchemyError as exc:
        raise Problem(503, "Service Unavailable", f"database unreachable: {type(exc).__name__}") from None
    return Health(status="ready")
