"""What the rollout tests share: a kitchen fleet on v1 with v2 approved, a publisher that records what it
was asked to publish, acks stored as the ingest stores them, and status windows."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import ArtifactStore
from cloud.registry import acks, devices, models
from cloud.registry.tables import Device, Rollout, RolloutTarget, TargetState, Telemetry
from cloud.signing import Desired
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model
from wire.messages import AckResult
from wire.messages import ModelAck as AckMessage

T0 = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Sent:
    """One desired model the engine published."""

    device_id: str
    model_id: str
    rollback_of: str | None


@dataclass
class RecordingPublisher:
    """A DesiredPublisher that keeps what it was asked to publish; optionally slow, or failing after
    `fail_after` documents (the broker went away mid-wave)."""

    sent: list[Sent] = field(default_factory=list)
    delay_s: float = 0.0
    fail_after: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish_desired_many(self, wanted: Sequence[Desired]) -> None:
        for device_id, manifest, rollback_of in wanted:
            if self.delay_s:
                time.sleep(self.delay_s)  # widens the window two racing passes would both publish in
            with self.lock:
                if self.fail_after is not None and len(self.sent) >= self.fail_after:
                    raise ConnectionError("the broker went away")
                self.sent.append(Sent(device_id, manifest.model_id, rollback_of))

    def take(self) -> list[Sent]:
        """What was published since the last take."""
        with self.lock:
            taken, self.sent = self.sent, []
        return taken


@dataclass(frozen=True)
class Fleet:
    """The kitchen line: v1 (what every device runs) and v2 (approved, to roll out)."""

    v1: str
    v2: str
    device_ids: list[str]


def kitchen_fleet(
    session: Session, store: ArtifactStore, device_ids: list[str], *, cohort_id: str = "kitchen"
) -> Fleet:
    """The cohort, its devices (each running and wanting v1), v1 and v2 approved; committed."""
    make_cohort(session, cohort_id)
    teacher = make_cloud_model(session, store, cohort_id)
    v1 = make_edge_model(session, store, teacher_id=teacher.id, cohort_id=cohort_id)
    v2 = make_edge_model(session, store, teacher_id=teacher.id, cohort_id=cohort_id, parent_id=v1.id)
    for model in (v1, v2):
        models.decide(session, model.id, approve=True)
    for device_id in device_ids:
        device, _ = make_device(session, device_id, cohort_id)
        device.desired_model_id = v1.id
        devices.report_model(session, device_id, v1.id)
    session.commit()
    return Fleet(v1=v1.id, v2=v2.id, device_ids=device_ids)


def send_acks(
    sessions: sessionmaker[Session], model_id: str, result: AckResult, *device_ids: str, reason: str = ""
) -> None:
    """Each device acks `model_id`, stored as the ingest stores acks."""
    now = datetime.now(UTC)
    messages = [
        AckMessage(
            device_id=d,
            model_id=model_id,
            result=result,
            reason=reason,
            sent_at=now,
            running_model_id=model_id if result is AckResult.installed else None,
        )
        for d in device_ids
    ]
    with sessions() as session, session.begin():
        acks.record_acks(session, messages, received_at=now)


def add_status(
    sessions: sessionmaker[Session],
    device_id: str,
    model_id: str,
    *,
    start: datetime,
    count: int,
    confidence: float | None,
    accuracy: float | None,
    every_s: float = 10.0,
) -> None:
    """`count` status windows of one device under `model_id`, every `every_s` from `start`."""
    with sessions() as session, session.begin():
        session.add_all(
            Telemetry(
                msg_id=uuid.uuid4(),
                device_id=device_id,
                at=start + timedelta(seconds=i * every_s),
                model_id=model_id,
                mean_confidence=confidence,
                accuracy=accuracy,
            )
            for i in range(count)
        )


def targets(sessions: sessionmaker[Session], rollout_id: uuid.UUID) -> dict[str, tuple[int, TargetState]]:
    """Each device's (wave, state) in the rollout."""
    with sessions() as session:
        rows = session.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == rollout_id))
        return {t.device_id: (t.wave, t.state) for t in rows}


def rollout_row(sessions: sessionmaker[Session], rollout_id: uuid.UUID) -> Rollout:
    with sessions() as session:
        return session.get_one(Rollout, rollout_id)


def desired(sessions: sessionmaker[Session], device_id: str) -> str | None:
    with sessions() as session:
        return session.get_one(Device, device_id).desired_model_id
