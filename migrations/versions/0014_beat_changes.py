"""the beat's passes look at what changed: rollout targets an ack moved, finished rollouts, reports the
scheduler has not seen, when a rollout is next due; and the indexes those passes read

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cloud.registry.tables import UTCDateTime

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANGED = {"postgresql_where": sa.text("changed"), "sqlite_where": sa.text("changed = 1")}
WAITING = {"postgresql_where": sa.text("status = 'received'"), "sqlite_where": sa.text("status = 'received'")}
UNNOTICED = {"postgresql_where": sa.text("NOT noticed"), "sqlite_where": sa.text("noticed = 0")}


def _flag(default: sa.sql.elements.ColumnElement[bool]) -> sa.Column[bool]:
    return sa.Column("changed", sa.Boolean(), server_default=default, nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("rollout_target", schema=None) as batch_op:
        batch_op.add_column(_flag(sa.false()))
        batch_op.create_index("ix_rollout_target_wave", ["rollout_id", "wave", "state"], unique=False)
        batch_op.create_index("ix_rollout_target_changed", ["rollout_id"], unique=False, **CHANGED)
    with op.batch_alter_table("rollout", schema=None) as batch_op:
        batch_op.add_column(_flag(sa.false()))
        batch_op.add_column(sa.Column("check_at", UTCDateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_rollout_changed", ["cohort_id"], unique=False, **CHANGED)
    # The reports stored before: noticed already, but for those still waiting for a job (the beat's first
    # pass then reads these few, not the whole history). New reports are not noticed.
    with op.batch_alter_table("knowledge_report", schema=None) as batch_op:
        batch_op.add_column(sa.Column("noticed", sa.Boolean(), server_default=sa.true(), nullable=False))
    op.execute("UPDATE knowledge_report SET noticed = false WHERE status = 'received'")
    with op.batch_alter_table("knowledge_report", schema=None) as batch_op:
        batch_op.alter_column(
            "noticed", existing_type=sa.Boolean(), existing_nullable=False, server_default=sa.false()
        )
        batch_op.create_index("ix_knowledge_report_unnoticed", ["base_model_id"], unique=False, **UNNOTICED)
        batch_op.create_index(
            "ix_knowledge_report_waiting", ["base_model_id", "received_at"], unique=False, **WAITING
        )
        batch_op.create_index("ix_knowledge_report_waiting_since", ["received_at"], unique=False, **WAITING)
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_finished_at"), ["finished_at"], unique=False)
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.create_index("ix_device_cohort_desired", ["cohort_id", "desired_model_id"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        # Statistics of the new columns now, not at autovacuum's leisure: without them the planner
        # guesses half the rows flagged and reads the tables whole where the partial indexes hold a few.
        op.execute("ANALYZE rollout_target, rollout, knowledge_report")


def downgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_index("ix_device_cohort_desired")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_finished_at"))
    with op.batch_alter_table("knowledge_report", schema=None) as batch_op:
        batch_op.drop_index("ix_knowledge_report_waiting_since")
        batch_op.drop_index("ix_knowledge_report_waiting")
        batch_op.drop_index("ix_knowledge_report_unnoticed")
        batch_op.drop_column("noticed")
    with op.batch_alter_table("rollout", schema=None) as batch_op:
        batch_op.drop_index("ix_rollout_changed")
        batch_op.drop_column("check_at")
        batch_op.drop_column("changed")
    with op.batch_alter_table("rollout_target", schema=None) as batch_op:
        batch_op.drop_index("ix_rollout_target_changed")
        batch_op.drop_index("ix_rollout_target_wave")
        batch_op.drop_column("changed")
