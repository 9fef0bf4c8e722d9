"""Registry model acks: stored once per msg_id, moving the device's rollout target and its reported model."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from cloud.artifacts import LocalArtifactStore
from cloud.registry import acks, devices, models, rollouts
from cloud.registry.tables import Device, ModelAck, Rollout, RolloutState, RolloutTarget, TargetState
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model
from wire.messages import AckResult
from wire.messages import ModelAck as AckMessage


@dataclass(frozen=True)
class Fleet:
    """The kitchen line: cam-a and cam-b run v1; a rollout of v2 offers it to cam-a, cam-b waits."""

    v1: str
    v2: str
    rollout: uuid.UUID
    now: datetime


def kitchen_rolling_out_v2(session: Session, store: LocalArtifactStore) -> Fleet:
    """Build `Fleet`: both devices report v1, the rollout of v2 is running."""
    make_cohort(session)
    teacher = make_cloud_model(session, store)
    v1 = models.decide(session, make_edge_model(session, store, teacher_id=teacher.id).id, approve=True)
    v2 = models.decide(session, make_edge_model(session, store, teacher_id=teacher.id).id, approve=True)
    for name in ("cam-a", "cam-b"):
        make_device(session, name)
        devices.report_model(session, name, v1.id)
    rollout = rollouts.create_rollout(session, model_id=v2.id, waves=[["cam-a"], ["cam-b"]], created_by="ops")
    rollout.state = RolloutState.running
    set_target(session, rollout.id, "cam-a", TargetState.offered)
    session.commit()
    return Fleet(v1=v1.id, v2=v2.id, rollout=rollout.id, now=datetime.now(UTC))


def set_target(session: Session, rollout_id: uuid.UUID, device_id: str, state: TargetState) -> None:
    """Put one device's target of the rollout in `state`."""
    session.execute(
        update(RolloutTarget)
        .where(RolloutTarget.rollout_id == rollout_id, RolloutTarget.device_id == device_id)
        .values(state=state)
    )


def ack(device_id: str, model_id: str, result: AckResult, at: datetime, **fields: Any) -> AckMessage:
    """A model ack as the device sends it."""
    return AckMessage(device_id=device_id, model_id=model_id, result=result, sent_at=at, **fields)


def target(session: Session, rollout_id: uuid.UUID, device_id: str) -> tuple[TargetState, str]:
    """(state, reason) of one device's target, read back from the database."""
    session.expire_all()
    row = session.get_one(RolloutTarget, (rollout_id, device_id))
    return row.state, row.reason


def reported(session: Session, device_id: str) -> str | None:
    """The model the registry says the device runs."""
    session.expire_all()
    return session.get_one(Device, device_id).reported_model_id


def ack_count(session: Session) -> int:
    """How many acks are stored."""
    return int(session.scalar(select(func.count()).select_from(ModelAck)) or 0)


@pytest.mark.parametrize("device_id", ["cam-a", "cam-b"], ids=["offered", "pending"])
def test_installed_moves_the_target_to_installed_and_sets_the_reported_model(
    session: Session, store: LocalArtifactStore, device_id: str
) -> None:
    # Prepare
    fleet = kitchen_rolling_out_v2(session, store)
    message = ack(device_id, fleet.v2, AckResult.installed, fleet.now, running_model_id=fleet.v2)
    other = "cam-b" if device_id == "cam-a" else "cam-a"
    other_before = target(session, fleet.rollout, other)

    # Execute
    new = acks.record_acks(session, [message], received_at=fleet.now + timedelta(seconds=1))
    session.commit()

    # Assert
    assert new == {message.msg_id}
    assert target(session, fleet.rollout, device_id) == (TargetState.installed, "")
    assert reported(session, device_id) == fleet.v2
    assert target(session, fleet.rollout, other) == other_before
    assert reported(session, other) == fleet.v1


def test_an_ack_is_stored_with_every_field(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    fleet = kitchen_rolling_out_v2(session, store)
    message = ack(
        "cam-a", fleet.v2, AckResult.failed, fleet.now, reason="self-test failed", running_model_id=fleet.v1
    )
    received_at = fleet.now + timedelta(seconds=2)

    # Execute
    acks.record_acks(session, [message], received_at=received_at)
    session.commit()
    session.expire_all()

    # Assert
    row = session.get_one(ModelAck, message.msg_id)
    assert (row.device_id, row.model_id, row.result, row.reason, row.running_model_id) == (
        "cam-a",
        fleet.v2,
        AckResult.failed,
        "self-test failed",
        fleet.v1,
    )
    assert (row.sent_at, row.received_at) == (fleet.now, received_at)


@pytest.mark.parametrize("running", ["v1", None], ids=["still-running-v1", "running-unsaid"])
def test_failed_keeps_the_reported_model_and_records_the_reason_on_the_target(
    session: Session, store: LocalArtifactStore, running: str | None
) -> None:
    # Prepare
    fleet = kitchen_rolling_out_v2(session, store)
    running_model_id = fleet.v1 if running else None
    message = ack(
        "cam-a",
        fleet.v2,
        AckResult.failed,
        fleet.now,
        reason="sha256 mismatch",
        running_model_id=running_model_id,
    )

    # Execute
    acks.record_acks(session, [message], received_at=fleet.now)
    session.commit()

    # Assert
    assert target(session, fleet.rollout, "cam-a") == (TargetState.failed, "sha256 mismatch")
    assert reported(session, "cam-a") == fleet.v1
    assert target(session, fleet.rollout, "cam-b") == (TargetState.pending, "")


def test_rolled_back_sets_the_running_model_as_reported(session: Session, store: LocalArtifactStore) -> None:
    # Prepare: cam-a said it ran v2 (a status), then its self-test failed and it went back to v1
    fleet = kitchen_rolling_out_v2(session, store)
    devices.report_model(session, "cam-a", fleet.v2)
    session.commit()
    message = ack(
        "cam-a",
        fleet.v2,
        AckResult.rolled_back,
        fleet.now,
        reason="probe outputs differ",
        running_model_id=fleet.v1,
    )

    # Execute
    acks.record_acks(session, [message], received_at=fleet.now)
    session.commit()

    # Assert
    assert target(session, fleet.rollout, "cam-a") == (TargetState.rolled_back, "probe outputs differ")
    assert reported(session, "cam-a") == fleet.v1


def test_an_ack_for_a_model_without_an_open_rollout_is_stored_without_touching_targets(
    session: Session, store: LocalArtifactStore
) -> None:
    # Prepare: the rollout of v2 was rolled back; v1 never had one
    fleet = kitchen_rolling_out_v2(session, store)
    session.get_one(Rollout, fleet.rollout).state = RolloutState.rolled_back
    session.commit()
    messages = [
        ack("cam-a", fleet.v2, AckResult.failed, fleet.now, reason="no space", running_model_id=fleet.v1),
        ack("cam-b", fleet.v1, AckResult.installed, fleet.now),
    ]

    # Execute
    new = acks.record_acks(session, messages, received_at=fleet.now)
    session.commit()

    # Assert
    assert new == {m.msg_id for m in messages}
    assert ack_count(session) == 2
    assert target(session, fleet.rollout, "cam-a") == (TargetState.offered, "")
    assert target(session, fleet.rollout, "cam-b") == (TargetState.pending, "")
    assert (reported(session, "cam-a"), reported(session, "cam-b")) == (fleet.v1, fleet.v1)


def test_a_late_ack_ends_the_target_of_a_completed_rollout(
    session: Session, store: LocalArtifactStore
) -> None:
    # Prepare: the rollout of v2 completed while cam-a was offline (its target still offered)
    fleet = kitchen_rolling_out_v2(session, store)
    session.get_one(Rollout, fleet.rollout).state = RolloutState.completed
    session.commit()
    message = ack("cam-a", fleet.v2, AckResult.installed, fleet.now, running_model_id=fleet.v2)

    # Execute: cam-a comes back, installs the retained desired model and acks
    acks.record_acks(session, [message], received_at=fleet.now)
    session.commit()

    # Assert
    assert target(session, fleet.rollout, "cam-a") == (TargetState.installed, "")
    assert reported(session, "cam-a") == fleet.v2
    assert target(session, fleet.rollout, "cam-b") == (TargetState.pending, "")


def test_an_ack_moves_only_the_target_of_that_models_rollout(
    session: Session, store: LocalArtifactStore
) -> None:
    # Prepare: a second open rollout, of v3, also waits on cam-a
    fleet = kitchen_rolling_out_v2(session, store)
    teacher = make_cloud_model(session, store)
    v3 = models.decide(session, make_edge_model(session, store, teacher_id=teacher.id).id, approve=True)
    other = rollouts.create_rollout(session, model_id=v3.id, waves=[["cam-a"]], created_by="ops")
    session.commit()

    # Execute
    acks.record_acks(session, [ack("cam-a", fleet.v2, AckResult.installed, fleet.now)], received_at=fleet.now)
    session.commit()

    # Assert
    assert target(session, fleet.rollout, "cam-a") == (TargetState.installed, "")
    assert target(session, other.id, "cam-a") == (TargetState.pending, "")
    assert reported(session, "cam-a") == fleet.v2  # the ack's model, though it named no running model


def test_an_installed_ack_of_a_model_the_registry_does_not_know_keeps_the_reported_model(
    session: Session, store: LocalArtifactStore
) -> None:
    # Prepare
    fleet = kitchen_rolling_out_v2(session, store)
    message = ack("cam-a", "kitchen.v99", AckResult.installed, fleet.now)

    # Execute
    new = acks.record_acks(session, [message], received_at=fleet.now)
    session.commit()

    # Assert
    assert new == {message.msg_id}
    assert reported(session, "cam-a") == fleet.v1
    assert target(session, fleet.rollout, "cam-a") == (TargetState.offered, "")


def test_the_same_ack_twice_is_stored_once(session: Session, store: LocalArtifactStore) -> None:
    # Prepare: the first delivery installed v2; the operator then re-offered cam-a's target
    fleet = kitchen_rolling_out_v2(session, store)
    message = ack("cam-a", fleet.v2, AckResult.installed, fleet.now)
    first = acks.record_acks(session, [message], received_at=fleet.now)
    set_target(session, fleet.rollout, "cam-a", TargetState.offered)
    session.commit()

    # Execute: redelivered alone, then twice in one batch
    again = acks.record_acks(session, [message], received_at=fleet.now + timedelta(seconds=5))
    twice = acks.record_acks(session, [message, message], received_at=fleet.now + timedelta(seconds=6))
    session.commit()

    # Assert
    assert first == {message.msg_id}
    assert again == set() and twice == set()
    assert ack_count(session) == 1
    assert target(session, fleet.rollout, "cam-a") == (TargetState.offered, "")
    row = session.get_one(ModelAck, message.msg_id)
    assert row.received_at == fleet.now


def test_a_new_ack_sent_twice_in_one_batch_is_stored_once(
    session: Session, store: LocalArtifactStore
) -> None:
    # Prepare
    fleet = kitchen_rolling_out_v2(session, store)
    message = ack("cam-a", fleet.v2, AckResult.installed, fleet.now)

    # Execute
    new = acks.record_acks(session, [message, message], received_at=fleet.now)
    session.commit()

    # Assert
    assert new == {message.msg_id}
    assert ack_count(session) == 1
    assert target(session, fleet.rollout, "cam-a") == (TargetState.installed, "")


def test_recording_no_acks_does_nothing(session: Session) -> None:
    # Execute
    new = acks.record_acks(session, [], received_at=datetime.now(UTC))

    # Assert
    assert new == set()
    assert ack_count(session) == 0


def test_an_ack_flags_the_target_it_moves_for_the_beat_and_a_pass_takes_exactly_those_flags(
    session: Session, store: LocalArtifactStore
) -> None:
    # Prepare
    fleet = kitchen_rolling_out_v2(session, store)
    message = ack("cam-a", fleet.v2, AckResult.installed, fleet.now, running_model_id=fleet.v2)
    cam_a = select(RolloutTarget.updated_at).where(RolloutTarget.device_id == "cam-a")

    # Execute
    acks.record_acks(session, [message], received_at=fleet.now)
    session.commit()
    flagged = sorted(session.scalars(select(RolloutTarget.device_id).where(RolloutTarget.changed)))
    moved_at = session.scalar(cam_a)
    taken = rollouts.take_acked(session, fleet.rollout)
    again = rollouts.take_acked(session, fleet.rollout)
    session.commit()

    # Assert: the flag, then taken once; taking it is bookkeeping, not a change of the target
    assert flagged == ["cam-a"]
    assert (taken, again) == (1, 0)
    assert session.scalars(select(RolloutTarget.device_id).where(RolloutTarget.changed)).all() == []
    assert session.scalar(cam_a) == moved_at
