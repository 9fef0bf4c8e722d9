"""A small fleet with an hour of history, written through the registry's models, for every panel to show."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from cloud.registry.tables import (
    Cohort,
    Device,
    DeviceStatus,
    Job,
    JobState,
    KnowledgeReport,
    KnowledgeStatus,
    Model,
    ModelKind,
    ModelStatus,
    Presence,
    Rollout,
    RolloutState,
    RolloutTarget,
    TargetState,
    Telemetry,
)

COHORT = "kitchen"
CLOUD_V1, EDGE_V1, EDGE_V2, EDGE_V3, EDGE_V4 = (
    "kitchen-cloud-v1",
    "kitchen-edge-v1",
    "kitchen-edge-v2",
    "kitchen-edge-v3",
    "kitchen-edge-v4",
)
# (id, presence, desired model, reported model); cam-01 sorts first, so it is the `device` variable's value.
DEVICES = [
    ("cam-01", Presence.online, EDGE_V2, EDGE_V2),
    ("cam-02", Presence.online, EDGE_V2, EDGE_V1),
    ("cam-03", Presence.offline, EDGE_V2, EDGE_V1),
    ("cam-04", Presence.unknown, None, None),
]
REVOKED = "cam-99"


def make_job(
    session: Session,
    now: datetime,
    kind: str,
    state: JobState,
    started: int | None,
    finished: int | None,
    **extra: object,
) -> Job:
    """A job of `kind` created before it started; `started`/`finished` are minutes ago."""
    job = Job(
        type=kind,
        cohort_id=COHORT,
        state=state,
        created_at=now - timedelta(minutes=(started or 5) + 1),
        started_at=None if started is None else now - timedelta(minutes=started),
        finished_at=None if finished is None else now - timedelta(minutes=finished),
        **extra,
    )
    session.add(job)
    return job


def make_model(
    session: Session,
    now: datetime,
    model_id: str,
    kind: ModelKind,
    version: int,
    status: ModelStatus,
    **extra: object,
) -> Model:
    """A model of the kitchen line; approved and rejected ones were decided `decided` minutes ago."""
    decided = extra.pop("decided", None)
    model = Model(
        id=model_id,
        cohort_id=COHORT,
        kind=kind,
        version=version,
        format="tflite" if kind is ModelKind.edge else "pt",
        sha256=f"{version:064x}",
        size=40_000 * version,
        status=status,
        created_at=now - timedelta(minutes=90 - 10 * version),
        decided_at=None if not isinstance(decided, int) else now - timedelta(minutes=decided),
        **extra,
    )
    session.add(model)
    return model


def seed_models_and_jobs(session: Session, now: datetime) -> Job:
    """The kitchen line: jobs in every state, a cloud model and edge models in every status."""
    session.add(Cohort(id=COHORT, description="kitchen cameras", created_at=now - timedelta(days=1)))
    done = make_job(session, now, "retrain", JobState.succeeded, 50, 40, progress=1.0, stage="register")
    make_job(session, now, "distill", JobState.succeeded, 45, 33, progress=1.0, stage="register")
    make_job(
        session,
        now,
        "export",
        JobState.failed,
        35,
        30,
        stage="export",
        attempts=3,
        error="int8 accuracy dropped",
    )
    make_job(
        session,
        now,
        "retrain",
        JobState.running,
        5,
        None,
        progress=0.4,
        stage="distill",
        lease_owner="worker-1",
    )
    make_job(session, now, "retrain", JobState.pending, None, None)
    make_job(session, now, "distill", JobState.cancelled, 20, 19)
    session.flush()
    make_model(session, now, CLOUD_V1, ModelKind.cloud, 1, ModelStatus.approved, metrics={"acc": 0.97})
    gate_pass = {"outcome": "pass", "reason": "better on every user"}
    make_model(
        session,
        now,
        EDGE_V1,
        ModelKind.edge,
        1,
        ModelStatus.retired,
        metrics={"int8_acc": 0.91, "float_acc": 0.92},
    )
    make_model(
        session,
        now,
        EDGE_V2,
        ModelKind.edge,
        2,
        ModelStatus.approved,
        metrics={"int8_acc": 0.95, "float_acc": 0.955, "gate": gate_pass},
        parent_id=EDGE_V1,
        teacher_id=CLOUD_V1,
        job_id=done.id,
        decided=38,
    )
    make_model(
        session,
        now,
        EDGE_V3,
        ModelKind.edge,
        3,
        ModelStatus.rejected,
        metrics={"int8_acc": "n/a", "gate": "fail"},  # not a number: the panels must not cast it
        status_reason="worse for cam-02",
        decided=12,
    )
    make_model(session, now, EDGE_V4, ModelKind.edge, 4, ModelStatus.candidate)
    session.flush()
    return done


def seed_devices(session: Session, now: datetime) -> None:
    """Four active devices (online, offline, never seen) and a revoked one."""
    for device_id, presence, desired, reported in DEVICES:
        session.add(
            Device(
                id=device_id,
                cohort_id=COHORT,
                credential_hash="0" * 64,
                presence=presence,
                desired_model_id=desired,
                reported_model_id=reported,
                last_seen=None if presence is Presence.unknown else now - timedelta(minutes=1),
                created_at=now - timedelta(days=1),
            )
        )
    session.add(
        Device(
            id=REVOKED,
            cohort_id=COHORT,
            credential_hash="0" * 64,
            status=DeviceStatus.revoked,
            revoked_at=now - timedelta(hours=2),
        )
    )
    session.flush()


def seed_rollouts(session: Session, now: datetime) -> None:
    """A completed rollout of v1 and a running one of v2, its targets at every stage."""
    finished = Rollout(
        cohort_id=COHORT, model_id=EDGE_V1, state=RolloutState.completed, created_at=now - timedelta(days=1)
    )
    running = Rollout(
        cohort_id=COHORT,
        model_id=EDGE_V2,
        state=RolloutState.running,
        current_wave=1,
        waves={"waves": [0.25, 1.0], "halt": {"confidence_drop": 0.05}},
        created_at=now - timedelta(minutes=35),
    )
    session.add_all([finished, running])
    session.flush()
    stages = [TargetState.installed, TargetState.offered, TargetState.failed, TargetState.pending]
    for (device_id, *_), stage in zip(DEVICES, stages, strict=True):
        session.add(
            RolloutTarget(rollout_id=finished.id, device_id=device_id, wave=0, state=TargetState.installed)
        )
        session.add(
            RolloutTarget(
                rollout_id=running.id,
                device_id=device_id,
                wave=int(stage is not TargetState.installed),
                state=stage,
            )
        )


def seed_knowledge(session: Session, now: datetime, job: Job) -> None:
    """Reports from the three seen devices over the last hour, in every status."""
    statuses = [KnowledgeStatus.consumed, KnowledgeStatus.received, KnowledgeStatus.discarded]
    for i in range(12):
        status = statuses[i % 3]
        received = now - timedelta(minutes=5 * i + 1)
        session.add(
            KnowledgeReport(
                msg_id=uuid.uuid4(),
                device_id=DEVICES[i % 3][0],
                base_model_id=EDGE_V1,
                schema="rd/1",
                size_bytes=2_000 + 100 * i,
                sample_count=20 + i,
                dp_epsilon=None if i % 2 else 4.0,
                metrics={"loss": 0.3},
                status=status,
                status_reason="stale base model" if status is KnowledgeStatus.discarded else "",
                job_id=job.id if status is KnowledgeStatus.consumed else None,
                sent_at=received - timedelta(seconds=3),
                received_at=received,
                payload=b"\x00" * 16,
            )
        )


def seed_telemetry(session: Session, now: datetime) -> None:
    """A status every two minutes from each seen device; cam-01 restarts half-way (its counter resets)."""
    for index, (device_id, _, _, reported) in enumerate(DEVICES[:3]):
        count = 0
        for step in range(30):
            at = now - timedelta(minutes=60 - 2 * step)
            count = 0 if (device_id == "cam-01" and step == 15) else count + 600 + 10 * step
            session.add(
                Telemetry(
                    msg_id=uuid.uuid4(),
                    device_id=device_id,
                    at=at,
                    model_id=reported,
                    uptime_s=120.0 * (step % 15 + 1),
                    inference_count=count,
                    latency_p50_ms=11.0 + index + step % 3,
                    latency_p95_ms=25.0 + index + step % 5,
                    mean_confidence=0.8 + 0.005 * (step % 10),
                    labelled_count=step,
                    accuracy=None if step == 0 else 0.85 + 0.004 * (step % 10) - 0.02 * index,
                    cpu_percent=30.0 + step % 20,
                    mem_bytes=200_000_000 + 1_000_000 * step,
                    temp_c=45.0 + step % 7,
                    class_histogram={str(c): (step + c) % 9 for c in range(10)},
                )
            )


def seed(session: Session, now: datetime) -> None:
    """Everything, committed."""
    job = seed_models_and_jobs(session, now)
    seed_devices(session, now)
    seed_rollouts(session, now)
    seed_knowledge(session, now, job)
    seed_telemetry(session, now)
    session.commit()
