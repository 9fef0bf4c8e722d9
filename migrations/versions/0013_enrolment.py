"""enrolment: devices that enrol by claim (pre-registered, or asked for and approved)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cloud.registry.tables import JSONType, UTCDateTime

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "enrolment",
        sa.Column("serial", sa.String(length=63), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "approved",
                "enrolled",
                "refused",
                name="enrolmentstate",
                native_enum=False,
                length=16,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column("cohort_id", sa.String(length=63), nullable=True),
        sa.Column("labels", JSONType, nullable=False),
        sa.Column("batch", sa.String(length=63), nullable=True),
        sa.Column("csr", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("requested_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("decided_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.String(length=160), nullable=True),
        sa.Column("enrolled_at", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["cohort_id"], ["cohort.id"], name=op.f("fk_enrolment_cohort_id_cohort")),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_enrolment")),
    )
    with op.batch_alter_table("enrolment", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_enrolment_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("enrolment", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enrolment_state"))
    op.drop_table("enrolment")
