"""Telemetry's daily partitions on PostgreSQL: created ahead, a default one for odd times, old days dropped.

`telemetry` is `PARTITION BY RANGE (at)` (migration 0012) with one partition per UTC day, named
`telemetry_pYYYYMMDD`, and `telemetry_default`, which takes a sample no daily partition does (a device
whose clock is off, or a day whose partition the beat has not made yet): no sample is ever refused.
Making a day's partition moves that day's rows out of the default one first, so it can be made at any
time. Old days go whole: detached and dropped, where deleting their rows would cost a scan, WAL for
every row and a vacuum. SQLite's telemetry is one plain table: every function here is PostgreSQL's.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

PARENT = "telemetry"
DEFAULT = "telemetry_default"
DAYS_AHEAD = 2  # the hourly beat makes today's partition and the next two days'
# One key for every process that changes telemetry's partitions: two workers making the same day's
# partition take turns (CREATE TABLE IF NOT EXISTS alone can still fail on a race in the catalogue).
LOCK_KEY = 0x7E1E_0012
# A lock that cannot be had soon is given up, and tried again on the next run: waiting for it would
# queue every reader and writer of telemetry behind this change (the beat runs hourly, two days ahead).
LOCK_TIMEOUT = "5s"
_NAME = re.compile(r"telemetry_p(\d{8})")


@dataclass(frozen=True)
class Dropped:
    """A daily partition detached and dropped, and how many samples it held (`rows`, counted by ANALYZE:
    exact up to its 30,000-row sample, an estimate from that sample beyond it)."""

    name: str
    rows: int


def partition_name(day: date) -> str:
    """The name of `day`'s partition."""
    return f"telemetry_p{day:%Y%m%d}"


def day_of(name: str) -> date | None:
    """The day a daily partition's name stands for; None for any other name."""
    found = _NAME.fullmatch(name)
    return datetime.strptime(found[1], "%Y%m%d").date() if found else None


def is_partition(name: str) -> bool:
    """Whether `name` is one of telemetry's partitions (which the models do not list)."""
    return name == DEFAULT or day_of(name) is not None


def is_partitioned(session: Session) -> bool:
    """Whether the database's telemetry is partitioned (PostgreSQL at migration 0012 or later)."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    kind: str | None = session.scalar(
        text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": PARENT}
    )
    return kind == "p"


def attached(session: Session) -> list[str]:
    """The names of telemetry's partitions, sorted."""
    names = session.scalars(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(:t) ORDER BY c.relname"
        ),
        {"t": PARENT},
    )
    return list(names)


def create_ahead(session: Session, *, days: int = DAYS_AHEAD, now: datetime | None = None) -> list[str]:
    """Make today's (UTC) partition and the next `days` days', and the default one, where missing;
    return the names made (none where telemetry is a plain table). Safe to run again, and from two
    processes at once."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    return create(session, [today + timedelta(days=n) for n in range(days + 1)])


def create(session: Session, days: Iterable[date]) -> list[str]:
    """Make the partitions of `days` (and the default one) where missing, each in a transaction of its
    own, committed; return the names made. A day's rows in the default partition move into its own.
    Nothing to make where telemetry is a plain table."""
    if not is_partitioned(session):
        return []
    made = []
    _begin_change(session)
    if session.scalar(text("SELECT to_regclass(:t)"), {"t": DEFAULT}) is None:
        session.execute(text(f"CREATE TABLE {DEFAULT} PARTITION OF {PARENT} DEFAULT"))
        made.append(DEFAULT)
    session.commit()
    for day in sorted(set(days)):
        name = partition_name(day)
        _begin_change(session)
        if session.scalar(text("SELECT to_regclass(:t)"), {"t": name}) is None:
            _attach(session, day)
            made.append(name)
        session.commit()
    return made


def _begin_change(session: Session) -> None:
    """Take the advisory lock for the transaction, then bound every later lock wait in it."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))


def _attach(session: Session, day: date) -> None:
    """Make `day`'s partition as a table of its own, move the day's rows from the default partition into
    it, and attach it. ATTACH PARTITION locks the parent in SHARE UPDATE EXCLUSIVE mode, which lets
    reads and writes go on, where CREATE TABLE ... PARTITION OF would lock out both. The default
    partition is locked first, so no row of the day can reach it between the move and the attach."""
    name = partition_name(day)
    lower, upper = _bound(day), _bound(day + timedelta(days=1))
    session.execute(text(f"LOCK TABLE ONLY {PARENT} IN SHARE UPDATE EXCLUSIVE MODE"))
    session.execute(text(f"LOCK TABLE ONLY {DEFAULT} IN ACCESS EXCLUSIVE MODE"))
    session.execute(text(f"CREATE TABLE {name} (LIKE {PARENT} INCLUDING DEFAULTS)"))
    session.execute(
        text(  # the names are constants and a date's digits, never input
            f"WITH moved AS (DELETE FROM {DEFAULT} WHERE at >= :lower AND at < :upper RETURNING *) "  # noqa: S608
            f"INSERT INTO {name} SELECT * FROM moved"
        ),
        {"lower": lower, "upper": upper},
    )
    session.execute(
        text(
            f"ALTER TABLE {PARENT} ATTACH PARTITION {name} "
            f"FOR VALUES FROM ('{lower.isoformat()}') TO ('{upper.isoformat()}')"
        )
    )


def _bound(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def drop_before(session: Session, day: date) -> list[Dropped]:
    """Detach and drop every daily partition of a day before `day`, each in a transaction of its own,
    committed; return them, oldest first. The default partition is left to the caller.

    DETACH locks the parent in ACCESS EXCLUSIVE mode for a moment (DETACH ... CONCURRENTLY is refused
    where a default partition exists); the lock timeout keeps it from queueing telemetry's readers and
    writers behind a long query."""
    dropped = []
    for name in attached(session):
        of = day_of(name)
        if of is None or of >= day:
            continue
        _begin_change(session)
        session.execute(text(f"ANALYZE {name}"))  # its row count: read whole below 30,000 rows, else sampled
        rows = session.scalar(text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"), {"t": name})
        session.execute(text(f"ALTER TABLE {PARENT} DETACH PARTITION {name}"))
        session.execute(text(f"DROP TABLE {name}"))
        session.commit()
        dropped.append(Dropped(name, max(0, round(rows or 0))))
    return dropped
