"""telemetry: partitioned by day on `at` (PostgreSQL); unique (msg_id, at) on both backends

PostgreSQL: the table becomes `PARTITION BY RANGE (at)` with one partition per UTC day, named
telemetry_pYYYYMMDD: one for each day of the last year the stored rows fall on, one for today and the
next two days, and a DEFAULT partition for any sample no daily partition takes. The rows are copied
over with their ids, and the id sequence carries on. Old days are then dropped whole instead of
deleted row by row (`cloud.registry.partitions`). Unique keys on a partitioned table must hold the
partition key: the primary key becomes (id, at) and the unique msg_id becomes (msg_id, at), which a
redelivered message (same msg_id, same sent_at) still hits.

SQLite keeps one plain table; its unique key becomes (msg_id, at) too, so one ON CONFLICT target
serves both backends.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 06:00:00
"""

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DAYS_AHEAD = 2  # as cloud.registry.partitions.DAYS_AHEAD when this was written
DAYS_BACK = 366  # rows older than this (a device's clock gone wrong) go to the default partition
INDEXES = (
    "CREATE INDEX ix_telemetry_device_at ON telemetry (device_id, at)",
    "CREATE INDEX ix_telemetry_model_at ON telemetry (model_id, at)",
    "CREATE INDEX ix_telemetry_at ON telemetry USING brin (at)",
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("telemetry", schema=None) as batch_op:
            batch_op.drop_constraint("uq_telemetry_msg_id", type_="unique")
            batch_op.create_unique_constraint("uq_telemetry_msg_id", ["msg_id", "at"])
        return
    # The old table keeps its rows until they are copied; its keys and indexes go first, so the new
    # table can take their names.
    op.execute("ALTER TABLE telemetry RENAME TO telemetry_unpartitioned")
    op.execute("ALTER TABLE telemetry_unpartitioned DROP CONSTRAINT pk_telemetry")
    op.execute("ALTER TABLE telemetry_unpartitioned DROP CONSTRAINT uq_telemetry_msg_id")
    op.execute("DROP INDEX ix_telemetry_device_at, ix_telemetry_model_at, ix_telemetry_at")
    op.execute(
        "CREATE TABLE telemetry (LIKE telemetry_unpartitioned INCLUDING DEFAULTS) PARTITION BY RANGE (at)"
    )
    op.execute("ALTER SEQUENCE telemetry_id_seq OWNED BY telemetry.id")  # dropped with its table otherwise
    op.execute("ALTER TABLE telemetry ADD CONSTRAINT pk_telemetry PRIMARY KEY (id, at)")
    op.execute("ALTER TABLE telemetry ADD CONSTRAINT uq_telemetry_msg_id UNIQUE (msg_id, at)")
    for statement in INDEXES:
        op.execute(statement)
    op.execute("CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT")
    for day in _days():
        upper = day + timedelta(days=1)
        op.execute(
            f"CREATE TABLE telemetry_p{day:%Y%m%d} PARTITION OF telemetry "
            f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') TO ('{upper.isoformat()} 00:00:00+00')"
        )
    op.execute("INSERT INTO telemetry SELECT * FROM telemetry_unpartitioned")
    op.execute("DROP TABLE telemetry_unpartitioned")


def _days() -> list[date]:
    """The UTC days of the stored rows within the last `DAYS_BACK` days, and today and `DAYS_AHEAD` after."""
    today = op.get_bind().execute(sa.text("SELECT (now() AT TIME ZONE 'UTC')::date")).scalar_one()
    since = datetime.combine(today - timedelta(days=DAYS_BACK), time(), UTC)
    stored = op.get_bind().execute(
        sa.text(
            "SELECT DISTINCT (at AT TIME ZONE 'UTC')::date FROM telemetry_unpartitioned WHERE at >= :since"
        ),
        {"since": since},
    )
    ahead = {today + timedelta(days=n) for n in range(DAYS_AHEAD + 1)}
    return sorted(ahead | set(stored.scalars()))


def downgrade() -> None:
    # Back to unique msg_id: should two stored samples share a msg_id (at different times), the one
    # stored first is kept.
    if op.get_bind().dialect.name != "postgresql":
        op.execute("DELETE FROM telemetry WHERE id NOT IN (SELECT min(id) FROM telemetry GROUP BY msg_id)")
        with op.batch_alter_table("telemetry", schema=None) as batch_op:
            batch_op.drop_constraint("uq_telemetry_msg_id", type_="unique")
            batch_op.create_unique_constraint("uq_telemetry_msg_id", ["msg_id"])
        return
    op.execute("CREATE TABLE telemetry_unpartitioned (LIKE telemetry INCLUDING DEFAULTS)")
    op.execute(
        "INSERT INTO telemetry_unpartitioned SELECT DISTINCT ON (msg_id) * FROM telemetry ORDER BY msg_id, id"
    )
    op.execute("ALTER SEQUENCE telemetry_id_seq OWNED BY telemetry_unpartitioned.id")
    op.execute("DROP TABLE telemetry")  # its partitions with it
    op.execute("ALTER TABLE telemetry_unpartitioned RENAME TO telemetry")
    op.execute("ALTER TABLE telemetry ADD CONSTRAINT pk_telemetry PRIMARY KEY (id)")
    op.execute("ALTER TABLE telemetry ADD CONSTRAINT uq_telemetry_msg_id UNIQUE (msg_id)")
    for statement in INDEXES:
        op.execute(statement)
