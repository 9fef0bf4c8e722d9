"""telemetry: a BRIN index on time and no foreign key to device (the ingest's rate)

The ingest checks in the same transaction that each sample's device is provisioned and active, and
devices are revoked, never deleted; the foreign key's per-row trigger (a KEY SHARE lock on the
device's row for every sample) cost PostgreSQL a fifth of its time per stored status. Samples arrive
in time order, so a BRIN index serves pruning by time at a fraction of a B-tree's upkeep.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 11:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.drop_constraint("fk_telemetry_device_id_device", type_="foreignkey")
        batch_op.drop_index("ix_telemetry_at")
        batch_op.create_index("ix_telemetry_at", ["at"], unique=False, postgresql_using="brin")


def downgrade() -> None:
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_at", postgresql_using="brin")
        batch_op.create_index("ix_telemetry_at", ["at"], unique=False)
        batch_op.create_foreign_key("fk_telemetry_device_id_device", "device", ["device_id"], ["id"])
