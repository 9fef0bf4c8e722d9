"""Telemetry: a time series of device status, written in batches, queried by device and time, pruned."""

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, select
from sqlalchemy.orm import Session

from cloud.registry.common import insert_new
from cloud.registry.tables import Telemetry, utcnow

PRUNE_BATCH = 10_000  # rows deleted per statement, so pruning never holds a long lock


def add_samples(session: Session, samples: Iterable[dict[str, Any]]) -> set[uuid.UUID]:
    """Insert status samples (column → value, `msg_id` included) in one statement, each msg_id once;
    return the msg_ids that were new."""
    return insert_new(session, Telemetry, list(samples), key="msg_id")


def query(
    session: Session,
    *,
    device_id: str | None = None,
    model_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int,
    offset: int = 0,
) -> Sequence[Telemetry]:
    """Samples in a time range, newest first."""
    statement: Select[Telemetry] = select(Telemetry).order_by(Telemetry.at.desc(), Telemetry.id.desc())
    if device_id is not None:
        statement = statement.where(Telemetry.device_id == device_id)
    if model_id is not None:
        statement = statement.where(Telemetry.model_id == model_id)
    if since is not None:
        statement = statement.where(Telemetry.at >= since)
    if until is not None:
        statement = statement.where(Telemetry.at < until)
    return session.scalars(statement.limit(limit).offset(offset)).all()


def prune(session: Session, *, retention: timedelta, now: datetime | None = None) -> int:
    """Delete samples older than the retention, committing each batch; return how many were deleted.

    Each batch is its own transaction, so pruning a day of a large fleet never holds a long lock.
    """
    cutoff = (now or utcnow()) - retention
    deleted = 0
    while True:
        ids = select(Telemetry.id).where(Telemetry.at < cutoff).limit(PRUNE_BATCH).scalar_subquery()
        count = session.execute(delete(Telemetry).where(Telemetry.id.in_(ids))).rowcount  # type: ignore[attr-defined]
        session.commit()
        deleted += int(count)
        if count < PRUNE_BATCH:
            return deleted
