"""Telemetry: a time series of device status, written in batches, queried by device and time, pruned."""

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

import msgspec
import orjson
from sqlalchemy import PoolProxiedConnection, Select, delete, select
from sqlalchemy.orm import Session

from cloud.registry import partitions
from cloud.registry.common import driver_errors, insert_new, paginate
from cloud.registry.tables import Telemetry, utcnow
from wire.fastpath import StatusRecord
from wire.messages import Status

PRUNE_BATCH = 10_000  # rows deleted per statement, so pruning never holds a long lock
# The unique key a stored sample is known by. PostgreSQL's unique keys on a table partitioned by `at`
# must hold `at`; a redelivered message carries the same sent_at (→ at), so (msg_id, at) stores each
# message once, as msg_id alone did.
UNIQUE = ("msg_id", "at")


def add_samples(session: Session, samples: Iterable[dict[str, Any]]) -> set[uuid.UUID]:
    """Insert status samples (column → value, `msg_id` included), each msg_id once; return the msg_ids
    that were new."""
    return insert_new(session, Telemetry, list(samples), key="msg_id", unique=UNIQUE)


def sample_of(status: Status | StatusRecord) -> dict[str, Any]:
    """The telemetry row of a status message."""
    return {
        "msg_id": status.msg_id,
        "device_id": status.device_id,
        "at": status.sent_at,
        **{name: getattr(status, name) for name in STATUS_COLUMNS},
        "class_histogram": status.class_histogram or None,
    }


def add_statuses(session: Session, statuses: Sequence[Status | StatusRecord]) -> set[uuid.UUID]:
    """Store validated status messages, each msg_id once; return the msg_ids that were new.

    On PostgreSQL the batch is copied straight into the table, inside a savepoint: nearly always every
    msg_id is new. When one was stored before (a redelivery after a crash), the savepoint is rolled
    back and the batch goes through a temporary table and INSERT ... ON CONFLICT DO NOTHING instead.
    (A multi-row INSERT spent more time in the driver than the database spent storing the rows; the
    temporary table on every batch, or the rows as JSON parsed by the database, cost it half again.)"""
    dialect = session.get_bind().dialect
    if not statuses or dialect.name != "postgresql":
        return add_samples(session, [sample_of(s) for s in statuses])
    lines = "".join(map(_copy_line, statuses)).encode()
    # The driver's own cursor bypasses SQLAlchemy: its errors come out as SQLAlchemy's, so callers
    # handle a bad row or a lost database alike on both backends.
    pooled = session.connection().connection
    with driver_errors(dialect, pooled, "COPY telemetry"):
        return _copy(pooled, lines, {s.msg_id for s in statuses})


# Status fields stored in a column of the same name; the others are msg_id, device_id, sent_at (→ at)
# and class_histogram (NULL when empty).
STATUS_COLUMNS = (
    "model_id",
    "uptime_s",
    "inference_count",
    "latency_p50_ms",
    "latency_p95_ms",
    "mean_confidence",
    "labelled_count",
    "accuracy",
    "cpu_percent",
    "mem_bytes",
    "temp_c",
)
COPY_COLUMNS = ("msg_id", "device_id", "at", *STATUS_COLUMNS, "class_histogram")
INCOMING = "telemetry_incoming"
NULL = "\\N"  # COPY's text format
_json = msgspec.json.Encoder().encode


def _copy_line(s: Status | StatusRecord) -> str:
    """`s` as a line of COPY's text format, in the order of `COPY_COLUMNS`, written out field by field
    (this runs a thousand times a batch). No value needs escaping: the contract's patterns keep
    backslashes, tabs and line ends out of device and model ids; the rest are numbers, a time, a
    UUID (as 32 hex digits, which PostgreSQL reads too, in a third of str()'s time), a time (RFC 3339
    as msgspec writes it, in an eighth of isoformat()'s) and JSON of digits. A float's str() reads
    back as the same float8."""
    h = s.class_histogram
    return (
        f"{s.msg_id.hex}\t{s.device_id}\t{_json(s.sent_at)[1:-1].decode()}\t"
        f"{NULL if s.model_id is None else s.model_id}\t"
        f"{s.uptime_s}\t{s.inference_count}\t"
        f"{NULL if s.latency_p50_ms is None else s.latency_p50_ms}\t"
        f"{NULL if s.latency_p95_ms is None else s.latency_p95_ms}\t"
        f"{NULL if s.mean_confidence is None else s.mean_confidence}\t"
        f"{NULL if s.labelled_count is None else s.labelled_count}\t"
        f"{NULL if s.accuracy is None else s.accuracy}\t"
        f"{NULL if s.cpu_percent is None else s.cpu_percent}\t"
        f"{NULL if s.mem_bytes is None else s.mem_bytes}\t"
        f"{NULL if s.temp_c is None else s.temp_c}\t"
        f"{orjson.dumps(h).decode() if h else NULL}\n"
    )


def _copy(pooled: PoolProxiedConnection, lines: bytes, msg_ids: set[uuid.UUID]) -> set[uuid.UUID]:
    import psycopg
    from psycopg import sql

    names = {
        "columns": sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS)),
        "incoming": sql.Identifier(INCOMING),
    }
    connection = pooled.driver_connection
    if not isinstance(connection, psycopg.Connection):
        raise TypeError(f"PostgreSQL through psycopg 3 expected, not {type(connection).__name__}")
    with connection.cursor() as cursor:
        try:
            with (
                connection.transaction(),
                cursor.copy(sql.SQL("COPY telemetry ({columns}) FROM STDIN").format(**names)) as copy,
            ):
                copy.write(lines)
            return msg_ids
        except psycopg.errors.UniqueViolation:
            pass  # some were stored before: the savepoint was rolled back, none of the batch is in
        cursor.execute(
            sql.SQL(
                "CREATE TEMPORARY TABLE IF NOT EXISTS {incoming} "
                "(LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            ).format(**names)
        )
        with cursor.copy(sql.SQL("COPY {incoming} ({columns}) FROM STDIN").format(**names)) as copy:
            copy.write(lines)
        cursor.execute(
            sql.SQL(
                "INSERT INTO telemetry ({columns}) SELECT {columns} FROM {incoming} "
                "ON CONFLICT (msg_id, at) DO NOTHING RETURNING msg_id"  # as UNIQUE
            ).format(**names)
        )
        new = {row[0] for row in cursor.fetchall()}
        # A batch that fails over to one message at a time reuses the table within the transaction.
        cursor.execute(sql.SQL("DELETE FROM {incoming}").format(**names))
    return new


def query_page(
    session: Session,
    *,
    device_id: str | None = None,
    model_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int,
    offset: int = 0,
) -> tuple[Sequence[Telemetry], int]:
    """A page of samples in a time range, newest first, and the number of samples that match in all."""
    statement = _selected(device_id=device_id, model_id=model_id, since=since, until=until)
    return paginate(session, statement, limit=limit, offset=offset)


def _selected(
    *, device_id: str | None, model_id: str | None, since: datetime | None, until: datetime | None
) -> Select[Telemetry]:
    statement = select(Telemetry).order_by(Telemetry.at.desc(), Telemetry.id.desc())
    if device_id is not None:
        statement = statement.where(Telemetry.device_id == device_id)
    if model_id is not None:
        statement = statement.where(Telemetry.model_id == model_id)
    if since is not None:
        statement = statement.where(Telemetry.at >= since)
    if until is not None:
        statement = statement.where(Telemetry.at < until)
    return statement


@dataclass(frozen=True)
class Pruned:
    """What pruning removed: samples deleted row by row, and daily partitions dropped whole."""

    deleted: int
    dropped: tuple[partitions.Dropped, ...] = ()

    @property
    def rows(self) -> int:
        """Every sample removed, the dropped partitions' included."""
        return self.deleted + sum(d.rows for d in self.dropped)


def prune(session: Session, *, retention: timedelta, now: datetime | None = None) -> int:
    """Remove samples older than the retention (`remove_expired`); return how many were removed."""
    return remove_expired(session, retention=retention, now=now).rows


def remove_expired(session: Session, *, retention: timedelta, now: datetime | None = None) -> Pruned:
    """Remove samples older than the retention, committing as it goes; return what was removed.

    A plain table (SQLite) loses every sample older than the cutoff (now - retention), deleted in
    batches, each its own transaction, so pruning never holds a long lock. A partitioned one
    (PostgreSQL) loses whole days: each daily partition of a day before the cutoff's is detached and
    dropped, and the default partition's samples from before the cutoff's day are deleted in batches.
    The cutoff's own day stays until it is wholly past: a sample is kept at least the retention and
    less than a day longer. Deleting that day's older rows every hour instead would be the row-by-row
    DELETE, its WAL and its vacuum that partitions are there to spare.
    """
    cutoff = (now or utcnow()) - retention
    if not partitions.is_partitioned(session):
        return Pruned(deleted=_delete_before(session, cutoff))
    day = cutoff.astimezone(UTC).date()
    dropped = partitions.drop_before(session, day)
    return Pruned(deleted=_delete_before(session, datetime.combine(day, time(), UTC)), dropped=tuple(dropped))


def _delete_before(session: Session, cutoff: datetime) -> int:
    deleted = 0
    while True:
        ids = select(Telemetry.id).where(Telemetry.at < cutoff).limit(PRUNE_BATCH).scalar_subquery()
        # `at` in both conditions lets PostgreSQL skip the partitions of later days.
        statement = delete(Telemetry).where(Telemetry.at < cutoff, Telemetry.id.in_(ids))
        count = session.execute(statement).rowcount  # type: ignore[attr-defined]
        session.commit()
        deleted += int(count)
        if count < PRUNE_BATCH:
            return deleted
