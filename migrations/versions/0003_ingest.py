"""ingest: model acks, and when a device's presence was last set (ordering presence across ingests)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 08:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cloud.registry.tables import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("presence_at", UTCDateTime(timezone=True), nullable=True))
    op.create_table(
        "model_ack",
        sa.Column("msg_id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column(
            "result",
            sa.Enum(
                "installed",
                "failed",
                "rolled_back",
                name="ackresult",
                native_enum=False,
                length=16,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("running_model_id", sa.String(length=128), nullable=True),
        sa.Column("sent_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("received_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"], name=op.f("fk_model_ack_device_id_device")),
        sa.PrimaryKeyConstraint("msg_id", name=op.f("pk_model_ack")),
    )
    with op.batch_alter_table("model_ack", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_ack_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_model_ack_model_id"), ["model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_model_ack_received_at"), ["received_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("model_ack", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_ack_received_at"))
        batch_op.drop_index(batch_op.f("ix_model_ack_model_id"))
        batch_op.drop_index(batch_op.f("ix_model_ack_device_id"))
    op.drop_table("model_ack")
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_column("presence_at")
