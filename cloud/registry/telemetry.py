"""Telemetry: a time series of device status, written in batches, queried by device and time, pruned."""

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Select, delete, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from cloud.registry.common import insert_new
from cloud.registry.tables import Telemetry, UTCDateTime, utcnow

PRUNE_BATCH = 10_000  # rows deleted per statement, so pruning never holds a long lock


def add_samples(session: Session, samples: Iterable[dict[str, Any]]) -> set[uuid.UUID]:
    """Insert status samples (column → value, `msg_id` included), each msg_id once; return the msg_ids
    that were new. On PostgreSQL the rows are copied into a temporary table and moved over in one
    statement: a multi-row INSERT of a thousand samples spent more time in the driver building the
    statement than the database spent storing it."""
    rows = list(samples)
    dialect = session.get_bind().dialect
    if not rows or dialect.name != "postgresql":
        return insert_new(session, Telemetry, rows, key="msg_id")
    import psycopg

    try:
        return _copy_new(session, rows)
    except psycopg.Error as exc:
        # The driver's own cursor bypasses SQLAlchemy: raise what SQLAlchemy would have (IntegrityError,
        # DataError, OperationalError...), so callers handle a bad row or a lost database on both backends.
        raise DBAPIError.instance("COPY telemetry", None, exc, psycopg.Error, dialect=dialect) from exc


INCOMING = "telemetry_incoming"


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


COLUMNS = [c.name for c in Telemetry.__table__.columns if c.name != "id"]
UTC_TIMESTAMP = UTCDateTime(timezone=True)


def _copy_new(session: Session, rows: list[dict[str, Any]]) -> set[uuid.UUID]:
    from psycopg import sql
    from psycopg.types.json import Jsonb

    names = {
        "columns": sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
        "incoming": sql.Identifier(INCOMING),
    }
    dialect = session.get_bind().dialect
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor:
        cursor.execute(
            sql.SQL(
                "CREATE TEMPORARY TABLE IF NOT EXISTS {incoming} "
                "(LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            ).format(**names)
        )
        with cursor.copy(sql.SQL("COPY {incoming} ({columns}) FROM STDIN").format(**names)) as copy:
            for row in rows:
                histogram = row.get("class_histogram")
                values = {
                    **row,
                    "at": UTC_TIMESTAMP.process_bind_param(row["at"], dialect),  # refuses naive times
                    "class_histogram": None if histogram is None else Jsonb(histogram, dumps=_json),
                }
                copy.write_row([values.get(name) for name in COLUMNS])
        cursor.execute(
            sql.SQL(
                "INSERT INTO telemetry ({columns}) SELECT {columns} FROM {incoming} "
                "ON CONFLICT (msg_id) DO NOTHING RETURNING msg_id"
            ).format(**names)
        )
        new = {row[0] for row in cursor.fetchall()}
        cursor.execute(sql.SQL("DELETE FROM {incoming}").format(**names))
    return new


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
