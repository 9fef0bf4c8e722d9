"""device: the trust version it reports, and whether the broker reflects its registry state

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 12:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trust_version", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "broker_sync",
                sa.Enum(
                    "pending",
                    "synced",
                    name="brokersync",
                    native_enum=False,
                    create_constraint=True,
                    length=16,
                ),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("broker_error", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_device_broker_sync"), ["broker_sync"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_broker_sync"))
        batch_op.drop_constraint(batch_op.f("ck_device_brokersync"), type_="check")
        batch_op.drop_column("broker_error")
        batch_op.drop_column("broker_sync")
        batch_op.drop_column("trust_version")
