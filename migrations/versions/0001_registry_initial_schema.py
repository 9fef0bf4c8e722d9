"""registry: initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 05:20:31.425185
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import cloud.registry.tables

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_key",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column(
            "role",
            sa.Enum(
                "viewer",
                "operator",
                "admin",
                name="role",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_key")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_key_key_hash")),
    )
    op.create_table(
        "audit_log",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=160), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=160), nullable=False),
        sa.Column(
            "detail",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_log_at"), ["at"], unique=False)

    op.create_table(
        "cohort",
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cohort")),
    )
    op.create_table(
        "job",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("cohort_id", sa.String(length=63), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "running",
                "succeeded",
                "failed",
                "cancelled",
                name="jobstate",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=False),
        sa.Column(
            "params",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "result",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_until", cloud.registry.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["cohort_id"], ["cohort.id"], name=op.f("fk_job_cohort_id_cohort")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job")),
    )
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_cohort_id"), ["cohort_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_job_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_job_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_job_type"), ["type"], unique=False)

    op.create_table(
        "model",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("cohort_id", sa.String(length=63), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("cloud", "edge", name="modelkind", native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.String(length=128), nullable=True),
        sa.Column("teacher_id", sa.String(length=128), nullable=True),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column(
            "manifest",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "metrics",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "status",
            sa.Enum(
                "candidate",
                "approved",
                "rejected",
                "retired",
                name="modelstatus",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("status_reason", sa.Text(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("decided_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["cohort_id"], ["cohort.id"], name=op.f("fk_model_cohort_id_cohort")),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_model_job_id_job")),
        sa.ForeignKeyConstraint(["parent_id"], ["model.id"], name=op.f("fk_model_parent_id_model")),
        sa.ForeignKeyConstraint(["teacher_id"], ["model.id"], name=op.f("fk_model_teacher_id_model")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model")),
        sa.UniqueConstraint("cohort_id", "kind", "version", name="uq_model_line_version"),
    )
    with op.batch_alter_table("model", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_cohort_id"), ["cohort_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_model_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_model_sha256"), ["sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_model_status"), ["status"], unique=False)

    op.create_table(
        "device",
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column("cohort_id", sa.String(length=63), nullable=False),
        sa.Column("credential_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "active", "revoked", name="devicestatus", native_enum=False, create_constraint=True, length=16
            ),
            nullable=False,
        ),
        sa.Column(
            "labels",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("desired_model_id", sa.String(length=128), nullable=True),
        sa.Column("reported_model_id", sa.String(length=128), nullable=True),
        sa.Column(
            "presence",
            sa.Enum(
                "unknown",
                "online",
                "offline",
                name="presence",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("presence_conn", sa.String(length=64), nullable=True),
        sa.Column("last_seen", cloud.registry.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["cohort_id"], ["cohort.id"], name=op.f("fk_device_cohort_id_cohort")),
        sa.ForeignKeyConstraint(
            ["desired_model_id"], ["model.id"], name=op.f("fk_device_desired_model_id_model")
        ),
        sa.ForeignKeyConstraint(
            ["reported_model_id"], ["model.id"], name=op.f("fk_device_reported_model_id_model")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device")),
    )
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_cohort_id"), ["cohort_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_device_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_device_desired_model_id"), ["desired_model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_device_reported_model_id"), ["reported_model_id"], unique=False)

    op.create_table(
        "rollout",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("cohort_id", sa.String(length=63), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "running",
                "paused",
                "halted",
                "completed",
                "rolled_back",
                name="rolloutstate",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column(
            "waves",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["cohort_id"], ["cohort.id"], name=op.f("fk_rollout_cohort_id_cohort")),
        sa.ForeignKeyConstraint(["model_id"], ["model.id"], name=op.f("fk_rollout_model_id_model")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout")),
    )
    with op.batch_alter_table("rollout", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rollout_cohort_id"), ["cohort_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_rollout_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_rollout_model_id"), ["model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_rollout_state"), ["state"], unique=False)

    op.create_table(
        "knowledge_report",
        sa.Column("msg_id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("base_model_id", sa.String(length=128), nullable=False),
        sa.Column("schema", sa.String(length=32), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("sample_count", sa.Integer(), nullable=False),
        sa.Column("dp_epsilon", sa.Float(), nullable=True),
        sa.Column(
            "metrics",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "status",
            sa.Enum(
                "received",
                "consumed",
                "discarded",
                name="knowledgestatus",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("status_reason", sa.Text(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("sent_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("received_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_model_id"], ["model.id"], name=op.f("fk_knowledge_report_base_model_id_model")
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["device.id"], name=op.f("fk_knowledge_report_device_id_device")
        ),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_knowledge_report_job_id_job")),
        sa.PrimaryKeyConstraint("msg_id", name=op.f("pk_knowledge_report")),
    )
    with op.batch_alter_table("knowledge_report", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_knowledge_report_base_model_id"), ["base_model_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_knowledge_report_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_knowledge_report_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_knowledge_report_received_at"), ["received_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_knowledge_report_status"), ["status"], unique=False)

    op.create_table(
        "rollout_target",
        sa.Column("rollout_id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "offered",
                "installed",
                "failed",
                "rolled_back",
                name="targetstate",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("updated_at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["device.id"], name=op.f("fk_rollout_target_device_id_device")
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollout.id"], name=op.f("fk_rollout_target_rollout_id_rollout")
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name=op.f("pk_rollout_target")),
    )
    with op.batch_alter_table("rollout_target", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rollout_target_device_id"), ["device_id"], unique=False)

    op.create_table(
        "telemetry",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("msg_id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("at", cloud.registry.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=True),
        sa.Column("uptime_s", sa.Float(), nullable=True),
        sa.Column("inference_count", sa.BigInteger(), nullable=True),
        sa.Column("latency_p50_ms", sa.Float(), nullable=True),
        sa.Column("latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("mean_confidence", sa.Float(), nullable=True),
        sa.Column("labelled_count", sa.Integer(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("cpu_percent", sa.Float(), nullable=True),
        sa.Column("mem_bytes", sa.BigInteger(), nullable=True),
        sa.Column("temp_c", sa.Float(), nullable=True),
        sa.Column(
            "class_histogram",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"], name=op.f("fk_telemetry_device_id_device")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry")),
        sa.UniqueConstraint("msg_id", name=op.f("uq_telemetry_msg_id")),
    )
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_telemetry_at"), ["at"], unique=False)
        batch_op.create_index("ix_telemetry_device_at", ["device_id", "at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_device_at")
        batch_op.drop_index(batch_op.f("ix_telemetry_at"))

    op.drop_table("telemetry")
    with op.batch_alter_table("rollout_target", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rollout_target_device_id"))

    op.drop_table("rollout_target")
    with op.batch_alter_table("knowledge_report", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_knowledge_report_status"))
        batch_op.drop_index(batch_op.f("ix_knowledge_report_received_at"))
        batch_op.drop_index(batch_op.f("ix_knowledge_report_job_id"))
        batch_op.drop_index(batch_op.f("ix_knowledge_report_device_id"))
        batch_op.drop_index(batch_op.f("ix_knowledge_report_base_model_id"))

    op.drop_table("knowledge_report")
    with op.batch_alter_table("rollout", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rollout_state"))
        batch_op.drop_index(batch_op.f("ix_rollout_model_id"))
        batch_op.drop_index(batch_op.f("ix_rollout_created_at"))
        batch_op.drop_index(batch_op.f("ix_rollout_cohort_id"))

    op.drop_table("rollout")
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_reported_model_id"))
        batch_op.drop_index(batch_op.f("ix_device_desired_model_id"))
        batch_op.drop_index(batch_op.f("ix_device_created_at"))
        batch_op.drop_index(batch_op.f("ix_device_cohort_id"))

    op.drop_table("device")
    with op.batch_alter_table("model", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_status"))
        batch_op.drop_index(batch_op.f("ix_model_sha256"))
        batch_op.drop_index(batch_op.f("ix_model_job_id"))
        batch_op.drop_index(batch_op.f("ix_model_cohort_id"))

    op.drop_table("model")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_type"))
        batch_op.drop_index(batch_op.f("ix_job_state"))
        batch_op.drop_index(batch_op.f("ix_job_created_at"))
        batch_op.drop_index(batch_op.f("ix_job_cohort_id"))

    op.drop_table("job")
    op.drop_table("cohort")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_at"))
        batch_op.drop_index(batch_op.f("ix_audit_log_action"))

    op.drop_table("audit_log")
    op.drop_table("api_key")
