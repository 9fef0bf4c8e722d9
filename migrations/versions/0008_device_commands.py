"""device_command: operators' commands to devices and the results the devices sent back

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cloud.registry.tables import JSONType, UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, length=16, create_constraint=True)


def upgrade() -> None:
    op.create_table(
        "device_command",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("command", _enum("commandname", "run_rd", "report_now"), nullable=False),
        sa.Column(
            "state",
            _enum("commandstate", "pending", "sent", "done", "failed", "refused", "expired"),
            nullable=False,
        ),
        sa.Column("requested_by", sa.String(length=160), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("sent_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("send_count", sa.Integer(), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("values", JSONType, nullable=False),
        sa.Column("result_msg_id", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["device.id"], name=op.f("fk_device_command_device_id_device")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_command")),
        sa.UniqueConstraint("result_msg_id", name=op.f("uq_device_command_result_msg_id")),
    )
    with op.batch_alter_table("device_command", schema=None) as batch_op:
        batch_op.create_index("ix_device_command_device_created", ["device_id", "created_at"], unique=False)
        batch_op.create_index("ix_device_command_state_expires", ["state", "expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("device_command", schema=None) as batch_op:
        batch_op.drop_index("ix_device_command_state_expires")
        batch_op.drop_index("ix_device_command_device_created")
    op.drop_table("device_command")
