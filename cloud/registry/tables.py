"""The registry's tables (DESIGN §4) as SQLAlchemy 2 typed models; only migrations create the schema."""

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from wire.messages import AckResult, CommandName  # stored as the device sent it

# Named constraints, so migrations can drop and alter them on both SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    """The current time in UTC, timezone-aware."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Base of every registry table."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as short strings with a CHECK, the same on both backends (no PostgreSQL ENUM types to migrate).
    return Enum(
        cls,
        native_enum=False,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
        create_constraint=True,
        name=cls.__name__.lower(),
    )


class Role(enum.StrEnum):
    """Operator roles, in increasing power."""

    viewer = "viewer"
    operator = "operator"
    admin = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)


class DeviceStatus(enum.StrEnum):
    active = "active"
    revoked = "revoked"


class BrokerSync(enum.StrEnum):
    """Whether the broker reflects a device's registry state (null: no broker is managed)."""

    pending = "pending"  # the registry changed; the reconciler has yet to apply it to the broker
    synced = "synced"


class EnrolmentState(enum.StrEnum):
    pending = "pending"  # a device asked with its claim; an operator decides
    approved = "approved"  # pre-registered or approved: the next request is granted
    enrolled = "enrolled"  # granted: the device exists, with its certificate
    refused = "refused"


class Presence(enum.StrEnum):
    unknown = "unknown"
    online = "online"
    offline = "offline"


class ModelKind(enum.StrEnum):
    cloud = "cloud"
    edge = "edge"


class ModelStatus(enum.StrEnum):
    candidate = "candidate"
    approved = "approved"
    rejected = "rejected"
    retired = "retired"


class KnowledgeStatus(enum.StrEnum):
    received = "received"  # stored by the ingest, waiting for a job
    consumed = "consumed"  # used by a job
    discarded = "discarded"  # dropped by a job (stale base model, failed checks)


class JobState(enum.StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class RolloutState(enum.StrEnum):
    pending = "pending"
    running = "running"
    paused = "paused"
    halted = "halted"  # being rolled back (the engine's next pass does it)
    completed = "completed"
    rolled_back = "rolled_back"
    stopped = "stopped"  # halted by an operator without a rollback (migration 0010)


class RolloutScope(enum.StrEnum):
    """Which devices a rollout is for."""

    cohort = "cohort"  # the cohort's active devices; once completed, its model is the cohort's current one
    devices = "devices"  # a list of devices, fixed when it starts
    selector = "selector"  # the devices whose labels match, resolved again at each wave


class TargetState(enum.StrEnum):
    pending = "pending"  # not yet offered
    offered = "offered"  # DesiredModel published
    installed = "installed"
    failed = "failed"
    rolled_back = "rolled_back"


class CommandState(enum.StrEnum):
    pending = "pending"  # stored; sent when its device is online
    sent = "sent"  # published to the device; no result yet
    done = "done"
    failed = "failed"
    refused = "refused"
    expired = "expired"  # not answered before `expires_at` (or the device found it stale)


class Cohort(Base):
    """A model line: the devices that share one cloud model and its edge models."""

    __tablename__ = "cohort"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Device(Base):
    """One provisioned device: its credential hash, cohort, models and presence."""

    __tablename__ = "device"
    __table_args__ = (
        # The devices of a cohort whose desired model is not the cohort's (reconcile_desired), read
        # without reading the others (migration 0014).
        Index("ix_device_cohort_desired", "cohort_id", "desired_model_id"),
    )

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    cohort_id: Mapped[str] = mapped_column(ForeignKey("cohort.id"), index=True)
    credential_hash: Mapped[str | None] = mapped_column(String(64))  # a password device's; else None
    status: Mapped[DeviceStatus] = mapped_column(_enum(DeviceStatus), default=DeviceStatus.active)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    desired_model_id: Mapped[str | None] = mapped_column(ForeignKey("model.id"), index=True)
    reported_model_id: Mapped[str | None] = mapped_column(ForeignKey("model.id"), index=True)
    presence: Mapped[Presence] = mapped_column(_enum(Presence), default=Presence.unknown)
    presence_conn: Mapped[str | None] = mapped_column(String(64))
    presence_at: Mapped[datetime | None]  # sent_at of the presence message that set `presence`
    last_seen: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    revoked_at: Mapped[datetime | None]
    trust_version: Mapped[int | None] = mapped_column(Integer)  # of the signing keys, as it reports
    broker_sync: Mapped[BrokerSync | None] = mapped_column(_enum(BrokerSync), index=True)
    broker_error: Mapped[str | None] = mapped_column(Text)  # why the last attempt to apply it failed
    # A certificate device's certificate, from the fleet CA (hex serial: the CRL names it by this).
    cert_serial: Mapped[str | None] = mapped_column(String(40), unique=True)
    cert_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    cert_not_after: Mapped[datetime | None]

    cohort: Mapped[Cohort] = relationship()


class Model(Base):
    """A cloud (teacher) or edge model of a line, with where it came from and whether it may ship."""

    __tablename__ = "model"
    __table_args__ = (UniqueConstraint("cohort_id", "kind", "version", name="uq_model_line_version"),)

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    cohort_id: Mapped[str] = mapped_column(ForeignKey("cohort.id"), index=True)
    kind: Mapped[ModelKind] = mapped_column(_enum(ModelKind))
    version: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("model.id"))
    teacher_id: Mapped[str | None] = mapped_column(ForeignKey("model.id"))
    format: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[ModelStatus] = mapped_column(_enum(ModelStatus), default=ModelStatus.candidate, index=True)
    status_reason: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("job.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None]


class KnowledgeReport(Base):
    """A device's RD knowledge report; the payload is kept for the pipeline and never served."""

    __tablename__ = "knowledge_report"
    __table_args__ = (
        # What the scheduler reads each pass (migration 0014): the reports it has not looked at yet, and
        # the received ones by base model (so by cohort) and by age.
        Index(
            "ix_knowledge_report_unnoticed",
            "base_model_id",
            postgresql_where=text("NOT noticed"),
            sqlite_where=text("noticed = 0"),
        ),
        Index(
            "ix_knowledge_report_waiting",
            "base_model_id",
            "received_at",
            postgresql_where=text("status = 'received'"),
            sqlite_where=text("status = 'received'"),
        ),
        Index(
            "ix_knowledge_report_waiting_since",
            "received_at",
            postgresql_where=text("status = 'received'"),
            sqlite_where=text("status = 'received'"),
        ),
    )

    msg_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id"), index=True)
    base_model_id: Mapped[str] = mapped_column(ForeignKey("model.id"), index=True)
    schema: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sample_count: Mapped[int] = mapped_column(Integer)
    dp_epsilon: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[KnowledgeStatus] = mapped_column(
        _enum(KnowledgeStatus), default=KnowledgeStatus.received, index=True
    )
    status_reason: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("job.id"), index=True)
    sent_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    # False until the beat's scheduler has looked at the report (cloud/pipeline/scheduling.py).
    noticed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Job(Base):
    """A unit of pipeline work, with its progress, outcome and the lease of the worker running it."""

    __tablename__ = "job"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    type: Mapped[str] = mapped_column(String(32), index=True)
    cohort_id: Mapped[str | None] = mapped_column(ForeignKey("cohort.id"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.pending, index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str] = mapped_column(String(64), default="")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None] = mapped_column(index=True)  # the jobs finished lately (0014)


class Rollout(Base):
    """The staged delivery of one approved edge model to a cohort's devices."""

    __tablename__ = "rollout"
    __table_args__ = (
        Index(
            "ix_rollout_changed",
            "cohort_id",
            postgresql_where=text("changed"),
            sqlite_where=text("changed = 1"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    cohort_id: Mapped[str] = mapped_column(ForeignKey("cohort.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("model.id"), index=True)
    state: Mapped[RolloutState] = mapped_column(_enum(RolloutState), default=RolloutState.pending, index=True)
    # Which devices it is for (migration 0009; rollouts from before are cohort-wide).
    scope: Mapped[RolloutScope] = mapped_column(
        _enum(RolloutScope), default=RolloutScope.cohort, server_default=RolloutScope.cohort.value
    )
    selector: Mapped[str | None] = mapped_column(Text)  # the label selector of a `selector` rollout
    waves: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the wave plan and halt thresholds
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # The beat's bookkeeping (migration 0014): finished (completed, stopped, rolled back) and not yet
    # looked at by reconcile_desired; and when advance_rollouts must look at it again though nothing
    # changed (None: at its next pass).
    changed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    check_at: Mapped[datetime | None]

    targets: Mapped[list["RolloutTarget"]] = relationship(back_populates="rollout")


class RolloutTarget(Base):
    """One device in a rollout: its wave and how far it got."""

    __tablename__ = "rollout_target"
    __table_args__ = (
        Index("ix_rollout_target_wave", "rollout_id", "wave", "state"),  # a wave's progress, counted
        Index(
            "ix_rollout_target_changed",
            "rollout_id",
            postgresql_where=text("changed"),
            sqlite_where=text("changed = 1"),
        ),
    )

    rollout_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("rollout.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id"), primary_key=True, index=True)
    wave: Mapped[int] = mapped_column(Integer)
    state: Mapped[TargetState] = mapped_column(_enum(TargetState), default=TargetState.pending)
    reason: Mapped[str] = mapped_column(Text, default="")
    # What the device ran when the rollout was planned: a rollback sends it back there (migration 0005).
    previous_model_id: Mapped[str | None] = mapped_column(ForeignKey("model.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # An ack moved it since the beat last looked (set with the move: `acks.record_acks`; migration 0014).
    changed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    rollout: Mapped[Rollout] = relationship(back_populates="targets")


class Telemetry(Base):
    """One status message of a device; a fast-growing time series, indexed by time and pruned.

    On PostgreSQL the table is partitioned by day on `at` (`cloud.registry.partitions`, migration
    0012); on SQLite it is one plain table. PostgreSQL's unique keys on a partitioned table must hold
    the partition key, hence the primary key (id, at) and the unique (msg_id, at).
    """

    __tablename__ = "telemetry"
    __table_args__ = (
        # A redelivered message carries the same sent_at, so (msg_id, at) stores it once, as msg_id did.
        UniqueConstraint("msg_id", "at"),
        Index("ix_telemetry_device_at", "device_id", "at"),
        Index("ix_telemetry_model_at", "model_id", "at"),  # accuracy per model version over time
        # Samples arrive in time order: a BRIN index serves pruning by time for little upkeep.
        Index("ix_telemetry_at", "at", postgresql_using="brin"),
        {"postgresql_partition_by": "RANGE (at)"},
    )

    # SQLite's primary key stays id alone (its row id, which numbers new rows); id is unique on both.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    msg_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    # No foreign key: the ingest checks the device in the same transaction, devices are never deleted,
    # and the key's per-row trigger cost PostgreSQL a fifth of its time per sample (migration 0004).
    device_id: Mapped[str] = mapped_column(String(63))
    at: Mapped[datetime] = mapped_column(primary_key=True)
    model_id: Mapped[str | None] = mapped_column(String(128))
    uptime_s: Mapped[float | None] = mapped_column(Float)
    inference_count: Mapped[int | None] = mapped_column(BigInteger)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    mean_confidence: Mapped[float | None] = mapped_column(Float)
    labelled_count: Mapped[int | None] = mapped_column(Integer)
    accuracy: Mapped[float | None] = mapped_column(Float)
    cpu_percent: Mapped[float | None] = mapped_column(Float)
    mem_bytes: Mapped[int | None] = mapped_column(BigInteger)
    temp_c: Mapped[float | None] = mapped_column(Float)
    # json, not jsonb: stored as the ingest copies it in, a fifth of PostgreSQL's time per row less.
    class_histogram: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ModelAck(Base):
    """A device's report of acting on a desired model, stored once per msg_id."""

    __tablename__ = "model_ack"

    msg_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id"), index=True)
    model_id: Mapped[str] = mapped_column(String(128), index=True)  # as the device sent it
    result: Mapped[AckResult] = mapped_column(_enum(AckResult))
    reason: Mapped[str] = mapped_column(Text, default="")
    running_model_id: Mapped[str | None] = mapped_column(String(128))
    sent_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Enrolment(Base):
    """A device's enrolment by claim, by its serial number (which becomes its device id): pre-registered
    by an operator, or asked for by the device with its batch's claim certificate and approved."""

    __tablename__ = "enrolment"

    serial: Mapped[str] = mapped_column(String(63), primary_key=True)
    state: Mapped[EnrolmentState] = mapped_column(_enum(EnrolmentState), index=True)
    cohort_id: Mapped[str | None] = mapped_column(ForeignKey("cohort.id"))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    batch: Mapped[str | None] = mapped_column(String(63))  # the claim it came with
    csr: Mapped[str | None] = mapped_column(Text)  # its latest request, kept while it waits
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    requested_at: Mapped[datetime | None]
    decided_at: Mapped[datetime | None]
    decided_by: Mapped[str | None] = mapped_column(String(160))
    enrolled_at: Mapped[datetime | None]


class ApiKey(Base):
    """An operator's bearer key: only its SHA-256 is stored (the key itself has 256 random bits)."""

    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # the public prefix of the key
    name: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[Role] = mapped_column(_enum(Role))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]


class AuditLog(Base):
    """Who changed what, when: one row per mutating call."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(160))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(160), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class DeviceCommand(Base):
    """An operator's command to one device (its id is the command message's msg_id) and its result."""

    __tablename__ = "device_command"
    __table_args__ = (
        Index("ix_device_command_device_created", "device_id", "created_at"),  # a device's, newest first
        Index("ix_device_command_state_expires", "state", "expires_at"),  # what to send, what expired
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id"))
    command: Mapped[CommandName] = mapped_column(_enum(CommandName))
    state: Mapped[CommandState] = mapped_column(_enum(CommandState), default=CommandState.pending)
    requested_by: Mapped[str] = mapped_column(String(160), default="")  # the audit log's actor
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]  # last published
    send_count: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    detail: Mapped[str] = mapped_column(Text, default="")
    values: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The device's result message: stored once; a second result for the command changes nothing.
    result_msg_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, unique=True)
