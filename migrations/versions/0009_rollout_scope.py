"""rollout: which devices it is for (the cohort, a list, or a label selector resolved at each wave)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollout", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "scope",
                sa.Enum(
                    "cohort",
                    "devices",
                    "selector",
                    name="rolloutscope",
                    native_enum=False,
                    create_constraint=True,
                    length=16,
                ),
                server_default="cohort",
                nullable=False,
            )
        )
        batch_op.add_column(sa.Column("selector", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollout", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_rollout_rolloutscope"), type_="check")
        batch_op.drop_column("selector")
        batch_op.drop_column("scope")
