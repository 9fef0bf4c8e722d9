"""rollout: the `stopped` state (halted by an operator without a rollback)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("pending", "running", "paused", "halted", "completed", "rolled_back")


def _states(states: Sequence[str]) -> None:
    with op.batch_alter_table("rollout", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_rollout_rolloutstate"), type_="check")
        batch_op.create_check_constraint(
            batch_op.f("ck_rollout_rolloutstate"), sa.column("state").in_(states)
        )


def upgrade() -> None:
    _states((*BEFORE, "stopped"))


def downgrade() -> None:
    # The nearest earlier meaning: finished, and not the cohort's current model.
    op.execute("UPDATE rollout SET state = 'rolled_back' WHERE state = 'stopped'")
    _states(BEFORE)
