"""rollout_target: the model each device ran before the rollout, which a rollback sends it back to

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 22:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollout_target", schema=None) as batch_op:
        batch_op.add_column(sa.Column("previous_model_id", sa.String(length=128), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_rollout_target_previous_model_id_model"), "model", ["previous_model_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("rollout_target", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_rollout_target_previous_model_id_model"), type_="foreignkey")
        batch_op.drop_column("previous_model_id")
