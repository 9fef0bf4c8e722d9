"""The rollout engine on SQLite and PostgreSQL: plans, waves (canary first), halts on failed installs
and on worse telemetry with signed rollbacks, pause and resume, operator rollback, the cohort's
current model for devices that join later, and passes that race or crash."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import ConflictError, InvalidValueError, NotFoundError
from cloud.pipeline.rollouts import (
    RolloutPlan,
    advance_rollouts,
    current_model,
    pause,
    reconcile_desired,
    request_rollback,
    resume,
    start_rollout,
    stop,
)
from cloud.registry import devices, models
from cloud.registry.tables import (
    Device,
    Presence,
    Rollout,
    RolloutScope,
    RolloutState,
    RolloutTarget,
    TargetState,
)
from tests.cloud.factories import make_cohort, make_device, make_edge_model
from tests.cloud.pipeline.rollout_fleet import (
    T0,
    Fleet,
    RecordingPublisher,
    Sent,
    add_status,
    desired,
    kitchen_fleet,
    rollout_row,
    send_acks,
    targets,
)
from wire.messages import AckResult

CAMS = [f"cam-{i}" for i in range(5)]
FAST = RolloutPlan(canary=1, waves=[0.5, 1.0], observe_s=60, wave_timeout_s=600)


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def fleet(session: Session, store: LocalArtifactStore) -> Fleet:
    return kitchen_fleet(session, store, CAMS)


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


def started(session: Session, fleet: Fleet, plan: RolloutPlan = FAST, **kwargs: object):  # type: ignore[no-untyped-def]
    rollout = start_rollout(session, model_id=fleet.v2, plan=plan, created_by="key:ops", **kwargs)  # type: ignore[arg-type]
    session.commit()
    return rollout.id


# --- the plan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "n", "waves"),
    [
        (RolloutPlan(), 5, [[0], [1, 2], [3, 4]]),
        (RolloutPlan(canary=2, waves=[0.1, 0.5, 1]), 12, [[0, 1], [2], [3, 4, 5, 6], [7, 8, 9, 10, 11]]),
        (RolloutPlan(canary=0, waves=1), 3, [[0, 1, 2]]),
        (RolloutPlan(canary=3), 2, [[0, 1]]),
        (RolloutPlan(waves=[0.3, 1]), 11, [[0], [1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]),
    ],
)
def test_a_plan_splits_devices_canary_first(plan: RolloutPlan, n: int, waves: list[list[int]]) -> None:
    assert plan.split([str(i) for i in range(n)]) == [[str(i) for i in wave] for wave in waves]


@pytest.mark.parametrize(
    "bad",
    [
        {"waves": [0.5, 0.4, 1]},
        {"waves": [0.5]},
        {"waves": []},
        {"waves": 0},
        {"waves": True},
        {"canary": -1},
        {"canary": "1"},
        {"max_failed_fraction": 1.5},
        {"confidence_drop": float("nan")},
        {"observe_s": -1},
        {"min_status": 0},
        {"wave_timeout_s": float("inf")},
        {"halt_failed": 1},
    ],
)
def test_a_plan_refuses_what_it_cannot_mean(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RolloutPlan.model_validate(bad)


# --- starting ---------------------------------------------------------------------------------------


def test_a_rollout_plans_the_cohorts_active_devices_online_first_and_skips_those_on_the_model(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet
) -> None:
    # Prepare: cam-3 is online (the best canary), cam-4 already runs v2, cam-2 is revoked
    session.get_one(Device, "cam-3").presence = Presence.online
    devices.report_model(session, "cam-4", fleet.v2)
    devices.revoke_device(session, "cam-2")
    session.commit()

    # Execute
    rollout_id = started(session, fleet)

    # Assert
    rollout = rollout_row(sessions, rollout_id)
    assert (rollout.state, rollout.current_wave, rollout.model_id) == (RolloutState.pending, 0, fleet.v2)
    assert rollout.waves["plan"] == FAST.model_dump(mode="json")
    assert targets(sessions, rollout_id) == {
        "cam-3": (0, TargetState.pending),
        "cam-0": (1, TargetState.pending),
        "cam-1": (2, TargetState.pending),
    }
    previous = {t.device_id: t.previous_model_id for t in session.query(RolloutTarget)}
    assert previous == {"cam-3": fleet.v1, "cam-0": fleet.v1, "cam-1": fleet.v1}


def test_a_rollout_refuses_what_it_cannot_do(
    session: Session, fleet: Fleet, store: LocalArtifactStore
) -> None:
    # Prepare: a garden cohort with a device; a candidate model
    make_cohort(session, "garden")
    make_device(session, "gate-1", "garden")
    session.commit()

    # Execute / Assert
    with pytest.raises(NotFoundError):
        start_rollout(session, model_id="kitchen.v9", created_by="ops")
    with pytest.raises(NotFoundError):
        start_rollout(session, model_id=fleet.v2, created_by="ops", device_ids=["cam-9"])
    with pytest.raises(ConflictError, match="not in cohort"):
        start_rollout(session, model_id=fleet.v2, created_by="ops", device_ids=["gate-1"])
    models.retire(session, fleet.v1)
    with pytest.raises(ConflictError, match="not an approved edge model"):
        start_rollout(session, model_id=fleet.v1, created_by="ops")
    session.rollback()
    started(session, fleet)
    with pytest.raises(ConflictError, match="already has an open rollout"):
        start_rollout(session, model_id=fleet.v2, created_by="ops")


# --- waves ------------------------------------------------------------------------------------------


def test_the_canary_goes_first_and_each_wave_waits_for_the_last_to_install_and_be_watched(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet, publisher: RecordingPublisher
) -> None:
    # Prepare
    rollout_id = started(session, fleet)

    # Execute / Assert: the canary is offered, and nothing more until it installed and was watched
    advance_rollouts(sessions, publisher, now=T0)
    assert publisher.take() == [Sent("cam-0", fleet.v2, None)]
    assert desired(sessions, "cam-0") == fleet.v2
    assert rollout_row(sessions, rollout_id).state is RolloutState.running
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=30))
    assert publisher.take() == []
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-0")
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=40))  # settled: watched from now
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=99))
    assert publisher.take() == []

    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=100))
    assert publisher.take() == [Sent("cam-1", fleet.v2, None), Sent("cam-2", fleet.v2, None)]
    assert rollout_row(sessions, rollout_id).current_wave == 1

    send_acks(sessions, fleet.v2, AckResult.installed, "cam-1", "cam-2")
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=110))
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=170))
    assert publisher.take() == [Sent("cam-3", fleet.v2, None), Sent("cam-4", fleet.v2, None)]

    send_acks(sessions, fleet.v2, AckResult.installed, "cam-3", "cam-4")
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=180))
    steps = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=240))

    # Assert: completed, every device installed, v2 the cohort's model; another pass does nothing
    assert [(s.state, s.note) for s in steps] == [(RolloutState.completed, "completed")]
    assert rollout_row(sessions, rollout_id).state is RolloutState.completed
    assert {state for _, state in targets(sessions, rollout_id).values()} == {TargetState.installed}
    assert current_model(session, "kitchen") == fleet.v2
    assert advance_rollouts(sessions, publisher, now=T0 + timedelta(hours=1)) == []
    assert publisher.take() == []


def test_devices_that_do_not_answer_hold_the_next_wave_only_until_the_wave_timeout(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet, publisher: RecordingPublisher
) -> None:
    # Prepare: the canary is offline
    rollout_id = started(session, fleet, RolloutPlan(canary=1, waves=1, observe_s=0, wave_timeout_s=300))
    advance_rollouts(sessions, publisher, now=T0)
    publisher.take()

    # Execute
    before = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=299))
    after = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=300))

    # Assert
    assert before == []
    assert [s.offered for s in after] == [["cam-1", "cam-2", "cam-3", "cam-4"]]
    assert targets(sessions, rollout_id)["cam-0"] == (0, TargetState.offered)


# --- halts ------------------------------------------------------------------------------------------


def test_a_failed_canary_halts_the_rollout_and_rolls_it_back_before_any_other_wave(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet, publisher: RecordingPublisher
) -> None:
    # Prepare: the canary was offered v2
    rollout_id = started(session, fleet)
    advance_rollouts(sessions, publisher, now=T0)
    publisher.take()

    # Execute: it acks `failed`, as the ingest stores it
    send_acks(sessions, fleet.v2, AckResult.failed, "cam-0", reason="self-test before the swap failed")
    steps = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=5))
    later = [advance_rollouts(sessions, publisher, now=T0 + timedelta(hours=h)) for h in (1, 2)]

    # Assert: a signed rollback to v1 for the canary; no other device ever offered v2
    rollout = rollout_row(sessions, rollout_id)
    assert rollout.state is RolloutState.rolled_back
    assert "1 of 1 installs failed" in rollout.reason and "self-test before the swap failed" in rollout.reason
    assert [s.rolled_back for s in steps] == [["cam-0"]]
    assert publisher.take() == [Sent("cam-0", fleet.v1, fleet.v2)]
    assert desired(sessions, "cam-0") == fleet.v1
    assert targets(sessions, rollout_id) == {
        "cam-0": (0, TargetState.rolled_back),
        "cam-1": (1, TargetState.pending),
        "cam-2": (1, TargetState.pending),
        "cam-3": (2, TargetState.pending),
        "cam-4": (2, TargetState.pending),
    }
    assert later == [[], []]
    assert all(desired(sessions, d) == fleet.v1 for d in CAMS)
    assert current_model(session, "kitchen") is None


def test_failures_within_the_allowed_fraction_do_not_halt(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet, publisher: RecordingPublisher
) -> None:
    # Prepare: no canary, one wave of 5; 1 failure in 5 is allowed, 2 are not
    plan = RolloutPlan(canary=0, waves=1, max_failed_fraction=0.2, observe_s=0)
    rollout_id = started(session, fleet, plan)
    advance_rollouts(sessions, publisher, now=T0)
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-0", "cam-1", "cam-2")
    send_acks(sessions, fleet.v2, AckResult.failed, "cam-3")

    # Execute
    one = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=1))
    send_acks(sessions, fleet.v2, AckResult.rolled_back, "cam-4", reason="probe outputs differ")
    two = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2))

    # Assert
    assert one == []
    assert [s.state for s in two] == [RolloutState.rolled_back]
    assert "2 of 5 installs failed" in rollout_row(sessions, rollout_id).reason


@pytest.mark.parametrize(
    ("confidence", "accuracy", "halts"),
    [
        ((0.90, 0.70), (0.95, 0.95), "mean confidence fell from 0.900 to 0.700"),
        ((0.90, 0.88), (0.95, 0.80), "error rate rose from 0.050 to 0.200"),
        ((0.90, 0.85), (0.95, 0.90), ""),
        ((0.90, 0.95), (0.80, 0.90), ""),
    ],
    ids=["confidence-drops", "errors-rise", "within-limits", "better"],
)
def test_worse_telemetry_under_the_new_model_halts_and_rolls_back(
    session: Session,
    sessions: sessionmaker[Session],
    fleet: Fleet,
    publisher: RecordingPublisher,
    confidence: tuple[float, float],
    accuracy: tuple[float, float],
    halts: str,
) -> None:
    # Prepare: the canary's hour under v1, then v2 offered at T0 and installed
    rollout_id = started(session, fleet)
    add_status(
        sessions, "cam-0", fleet.v1, start=T0 - timedelta(minutes=10), count=6,
        confidence=confidence[0], accuracy=accuracy[0],
    )  # fmt: skip
    add_status(
        sessions, "cam-0", fleet.v1, start=T0 - timedelta(hours=3), count=6, confidence=0.1, accuracy=0.1
    )
    advance_rollouts(sessions, publisher, now=T0)
    publisher.take()
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-0")

    # Execute: two windows under v2 are too few to judge; the third decides
    add_status(
        sessions, "cam-0", fleet.v2, start=T0 + timedelta(seconds=15), count=2,
        confidence=confidence[1], accuracy=accuracy[1],
    )  # fmt: skip
    early = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=40))
    add_status(
        sessions, "cam-0", fleet.v2, start=T0 + timedelta(seconds=45), count=1,
        confidence=confidence[1], accuracy=accuracy[1],
    )  # fmt: skip
    judged = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=50))
    moved_on = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=100))

    # Assert
    assert early == []
    health = rollout_row(sessions, rollout_id).waves["stages"][0]["health"]
    assert (health["judged"], health["confidence_before"], health["accuracy_after"]) == (
        1,
        confidence[0],
        accuracy[1],
    )
    if halts:
        assert [s.state for s in judged] == [RolloutState.rolled_back]
        assert halts in rollout_row(sessions, rollout_id).reason
        assert publisher.take() == [Sent("cam-0", fleet.v1, fleet.v2)]
        assert moved_on == []
    else:
        assert judged == []
        assert [s.offered for s in moved_on] == [["cam-1", "cam-2"]]


def test_a_device_with_a_baseline_holds_the_wave_until_its_status_under_the_new_model_arrives(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet, publisher: RecordingPublisher
) -> None:
    # Prepare: the canary sent status under v1, installs v2, then is silent
    started(session, fleet, RolloutPlan(observe_s=60, wave_timeout_s=600))
    add_status(
        sessions, "cam-0", fleet.v1, start=T0 - timedelta(minutes=5), count=5, confidence=0.9, accuracy=0.9
    )
    advance_rollouts(sessions, publisher, now=T0)
    publisher.take()
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-0")
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=10))  # settled

    # Execute
    waiting = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=669))
    given_up = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=670))

    # Assert
    assert waiting == []
    assert [s.offered for s in given_up] == [["cam-1", "cam-2"]]


# --- operators ---------------------------------------------------------------------------------------


def test_a_paused_rollout_offers_nothing_until_it_resumes(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet, publisher: RecordingPublisher
) -> None:
    # Prepare
    rollout_id = started(session, fleet, RolloutPlan(observe_s=0))
    advance_rollouts(sessions, publisher, now=T0)
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-0")

    # Execute
    rollout = pause(session, rollout_id, reason="holiday freeze")
    session.commit()
    paused = (rollout.state, rollout.reason)
    while_paused = advance_rollouts(sessions, publisher, now=T0 + timedelta(hours=1))
    with pytest.raises(ConflictError, match="only a pending or running one pauses"):
        pause(session, rollout_id)
    session.rollback()
    rollout = resume(session, rollout_id)
    session.commit()
    resumed = (rollout.state, rollout.reason)
    after = advance_rollouts(sessions, publisher, now=T0 + timedelta(hours=2))

    # Assert
    assert paused == (RolloutState.paused, "holiday freeze")
    assert while_paused == []
    assert resumed == (RolloutState.running, "")
    assert [s.offered for s in after] == [["cam-1", "cam-2"]]
    with pytest.raises(ConflictError, match="not paused"):
        resume(session, rollout_id)


def test_an_operator_rollback_sends_every_device_the_rollout_reached_back(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet, publisher: RecordingPublisher
) -> None:
    # Prepare: cam-0 installed, cam-1 installed, cam-2 offered (offline), cam-3 and cam-4 not yet offered
    rollout_id = started(session, fleet, RolloutPlan(observe_s=0))
    advance_rollouts(sessions, publisher, now=T0)
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-0")
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=1))
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-1")
    publisher.take()

    # Execute: the API only records the request; the next pass carries it out
    halted = request_rollback(session, rollout_id, requested_by="key:ops", reason="customer complaints")
    session.commit()
    published_by_the_request = publisher.take()
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2))

    # Assert
    assert (halted.state, halted.reason) == (
        RolloutState.halted,
        "rollback requested by key:ops: customer complaints",
    )
    assert published_by_the_request == []
    assert sorted(publisher.take(), key=lambda s: s.device_id) == [
        Sent(d, fleet.v1, fleet.v2) for d in ("cam-0", "cam-1", "cam-2")
    ]
    assert rollout_row(sessions, rollout_id).state is RolloutState.rolled_back
    assert [state for _, state in sorted(targets(sessions, rollout_id).values())] == [
        TargetState.rolled_back,
        TargetState.rolled_back,
        TargetState.rolled_back,
        TargetState.pending,
        TargetState.pending,
    ]
    with pytest.raises(ConflictError, match="cannot be rolled back now"):
        request_rollback(session, rollout_id, requested_by="key:ops")


def test_a_rollback_that_changes_no_device_says_so(
    session: Session,
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    publisher: RecordingPublisher,
) -> None:
    # Prepare: the cohort's first rollout, to new devices that ran no model before; the canary installs
    fleet = kitchen_fleet(session, store, [])
    for device_id in ("new-0", "new-1"):
        make_device(session, device_id)
    session.commit()
    rollout = start_rollout(session, model_id=fleet.v1, plan=FAST, created_by="key:ops")
    session.commit()
    advance_rollouts(sessions, publisher, now=T0)
    send_acks(sessions, fleet.v1, AckResult.installed, "new-0")
    publisher.take()

    # Execute
    request_rollback(session, rollout.id, requested_by="key:ops", reason="wrong model")
    session.commit()
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=1))

    # Assert: rolled back, and the reason says nothing changed on any device
    row = rollout_row(sessions, rollout.id)
    assert row.state is RolloutState.rolled_back
    assert row.reason == (
        "rollback requested by key:ops: wrong model; "
        "no device changed (1 reached, none with an earlier edge model recorded)"
    )
    assert publisher.take() == []


def test_the_cohorts_latest_completed_rollout_can_be_rolled_back_and_its_model_is_no_longer_current(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet, publisher: RecordingPublisher
) -> None:
    # Prepare: v2 rolled out to everyone
    rollout_id = started(session, fleet, RolloutPlan(canary=0, waves=1, observe_s=0))
    advance_rollouts(sessions, publisher, now=T0)
    send_acks(sessions, fleet.v2, AckResult.installed, *CAMS)
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=1))
    assert current_model(session, "kitchen") == fleet.v2
    publisher.take()

    # Execute
    request_rollback(session, rollout_id, requested_by="key:ops")
    session.commit()
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2))

    # Assert
    assert sorted(publisher.take(), key=lambda s: s.device_id) == [Sent(d, fleet.v1, fleet.v2) for d in CAMS]
    assert current_model(session, "kitchen") is None
    assert reconcile_desired(sessions, publisher) == 0


# --- devices that join later -------------------------------------------------------------------------


def test_devices_outside_an_open_rollout_get_the_cohorts_current_model(
    session: Session,
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    fleet: Fleet,
    publisher: RecordingPublisher,
) -> None:
    # Prepare: v2 completed on cam-0..cam-4; then cam-new joins, and cam-old shows up running a v3 it
    # got elsewhere (a newer version: it must be told which model it rolls back)
    started(session, fleet, RolloutPlan(canary=0, waves=1, observe_s=0))
    advance_rollouts(sessions, publisher, now=T0)
    send_acks(sessions, fleet.v2, AckResult.installed, *CAMS)
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=1))
    publisher.take()
    teacher = models.get_model(session, fleet.v1).teacher_id
    assert teacher is not None
    v3 = make_edge_model(session, store, teacher_id=teacher)
    make_device(session, "cam-new")
    make_device(session, "cam-old")
    devices.report_model(session, "cam-old", v3.id)
    session.commit()

    # Execute
    published = reconcile_desired(sessions, publisher)
    again = reconcile_desired(sessions, publisher)

    # Assert
    assert (published, again) == (2, 0)
    assert sorted(publisher.take(), key=lambda s: s.device_id) == [
        Sent("cam-new", fleet.v2, None),
        Sent("cam-old", fleet.v2, v3.id),
    ]
    assert desired(sessions, "cam-new") == desired(sessions, "cam-old") == fleet.v2


def test_devices_of_an_open_rollout_are_left_to_it(
    session: Session,
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    fleet: Fleet,
    publisher: RecordingPublisher,
) -> None:
    # Prepare: v2 is the cohort's model; v3 is being offered to cam-1 and cam-2; cam-new joins
    v3 = completed_v2_then_approved_v3(session, sessions, store, fleet, publisher)
    start_rollout(session, model_id=v3, plan=ALL_AT_ONCE, created_by="ops", device_ids=["cam-1", "cam-2"])
    session.commit()
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2))
    publisher.take()
    make_device(session, "cam-new")
    session.commit()

    # Execute
    published = reconcile_desired(sessions, publisher)

    # Assert: only cam-new is given v2; the rollout keeps its devices on v3
    assert published == 1
    assert publisher.take() == [Sent("cam-new", fleet.v2, None)]
    assert (desired(sessions, "cam-1"), desired(sessions, "cam-2")) == (v3, v3)


# --- rollouts to some devices: a list, or a label selector --------------------------------------------

ALL_AT_ONCE = RolloutPlan(canary=0, waves=1, observe_s=0)


def completed_v2_then_approved_v3(
    session: Session,
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    fleet: Fleet,
    publisher: RecordingPublisher,
) -> str:
    """v2 rolled out to the whole cohort (its current model), then v3 approved; returns v3's id."""
    started(session, fleet, ALL_AT_ONCE)
    advance_rollouts(sessions, publisher, now=T0)
    send_acks(sessions, fleet.v2, AckResult.installed, *CAMS)
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=1))
    publisher.take()
    teacher = models.get_model(session, fleet.v2).teacher_id
    assert teacher is not None
    v3 = make_edge_model(session, store, teacher_id=teacher, parent_id=fleet.v2)
    models.decide(session, v3.id, approve=True)
    session.commit()
    return v3.id


def v3_completed_on_cam_1(
    session: Session,
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    fleet: Fleet,
    publisher: RecordingPublisher,
) -> tuple[str, uuid.UUID]:
    """`completed_v2_then_approved_v3`, then v3 rolled out to cam-1 alone and installed there (the
    rollout run to its end); returns v3's id and that rollout's."""
    v3 = completed_v2_then_approved_v3(session, sessions, store, fleet, publisher)
    trial = start_rollout(session, model_id=v3, plan=ALL_AT_ONCE, created_by="ops", device_ids=["cam-1"])
    session.commit()
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2))
    send_acks(sessions, v3, AckResult.installed, "cam-1")
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=3))
    publisher.take()
    return v3, trial.id


def test_a_completed_rollout_to_some_devices_changes_only_them(
    session: Session,
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    fleet: Fleet,
    publisher: RecordingPublisher,
) -> None:
    # Prepare: v3 rolled out to cam-1 alone, completed; then cam-new joins the cohort
    v3, trial_id = v3_completed_on_cam_1(session, sessions, store, fleet, publisher)
    assert rollout_row(sessions, trial_id).state is RolloutState.completed
    make_device(session, "cam-new")
    session.commit()

    # Execute
    published = reconcile_desired(sessions, publisher)

    # Assert: v2 stays the cohort's model, which cam-new gets; cam-1 keeps v3, the others v2
    assert current_model(session, "kitchen") == fleet.v2
    assert published == 1
    assert publisher.take() == [Sent("cam-new", fleet.v2, None)]
    assert [desired(sessions, d) for d in CAMS] == [fleet.v2, v3, fleet.v2, fleet.v2, fleet.v2]
    assert reconcile_desired(sessions, publisher) == 0


def test_only_the_latest_finished_rollout_rolls_back_and_the_cohort_model_then_returns(
    session: Session,
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    fleet: Fleet,
    publisher: RecordingPublisher,
) -> None:
    # Prepare: v2 cohort-wide (completed), then v3 to cam-1 (completed)
    v3, trial_id = v3_completed_on_cam_1(session, sessions, store, fleet, publisher)
    cohort_wide = session.scalars(select(Rollout.id).where(Rollout.model_id == fleet.v2)).one()

    # Execute / Assert: the earlier rollout cannot be rolled back past the later one
    with pytest.raises(ConflictError, match="no longer its cohort's latest finished rollout"):
        request_rollback(session, cohort_wide, requested_by="key:ops")
    session.rollback()
    request_rollback(session, trial_id, requested_by="key:ops")
    session.commit()
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=4))
    assert publisher.take() == [Sent("cam-1", fleet.v2, v3)]
    assert reconcile_desired(sessions, publisher) == 0
    request_rollback(session, cohort_wide, requested_by="key:ops")  # now it is the latest again
    session.commit()


def test_a_halted_rollout_offers_no_more_keeps_its_devices_and_can_still_be_rolled_back(
    session: Session,
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    fleet: Fleet,
    publisher: RecordingPublisher,
) -> None:
    # Prepare: v2 is the cohort's model; v3's canary cam-0 installed, its next wave offered (cam-1
    # installs, cam-2 is offline), the last wave (cam-3, cam-4) not offered yet
    v3 = completed_v2_then_approved_v3(session, sessions, store, fleet, publisher)
    plan = RolloutPlan(canary=1, waves=[0.5, 1.0], observe_s=0)
    rollout_id = start_rollout(session, model_id=v3, plan=plan, created_by="ops").id
    session.commit()
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2))
    send_acks(sessions, v3, AckResult.installed, "cam-0")
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=3))
    send_acks(sessions, v3, AckResult.installed, "cam-1")
    publisher.take()

    # Execute: halted; cam-2 comes back and installs what it was offered
    rollout = stop(session, rollout_id, requested_by="key:ops", reason="enough for today")
    session.commit()
    stopped = (rollout.state, rollout.reason)
    passes = advance_rollouts(sessions, publisher, now=T0 + timedelta(hours=1))
    send_acks(sessions, v3, AckResult.installed, "cam-2")
    reconciled = reconcile_desired(sessions, publisher)

    # Assert: nothing more offered; the devices keep what they run; v2 stays the cohort's model
    assert stopped == (RolloutState.stopped, "halted by key:ops: enough for today")
    assert (passes, reconciled, publisher.take()) == ([], 0, [])
    assert targets(sessions, rollout_id) == {
        "cam-0": (0, TargetState.installed),
        "cam-1": (1, TargetState.installed),
        "cam-2": (1, TargetState.installed),
        "cam-3": (2, TargetState.pending),
        "cam-4": (2, TargetState.pending),
    }
    assert current_model(session, "kitchen") == fleet.v2
    assert [desired(sessions, d) for d in CAMS] == [v3, v3, v3, fleet.v2, fleet.v2]
    with pytest.raises(ConflictError, match="only an open one is halted"):
        stop(session, rollout_id, requested_by="key:ops")
    session.rollback()

    # Execute / Assert: a rollback of the stopped rollout sends its devices back to v2
    request_rollback(session, rollout_id, requested_by="key:ops")
    session.commit()
    advance_rollouts(sessions, publisher, now=T0 + timedelta(hours=2))
    assert sorted(publisher.take(), key=lambda s: s.device_id) == [
        Sent(d, fleet.v2, v3) for d in ("cam-0", "cam-1", "cam-2")
    ]
    assert rollout_row(sessions, rollout_id).state is RolloutState.rolled_back


def test_a_selector_rollout_is_resolved_again_before_each_wave(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet, publisher: RecordingPublisher
) -> None:
    # Prepare: cam-0 and cam-1 are in the beta group
    for device_id in ("cam-0", "cam-1"):
        devices.set_labels(session, device_id, {"tier": "beta"})
    session.commit()
    rollout_id = started(session, fleet, RolloutPlan(canary=1, waves=1, observe_s=0), selector="tier=beta")
    assert targets(sessions, rollout_id) == {
        "cam-0": (0, TargetState.pending),
        "cam-1": (1, TargetState.pending),
    }
    advance_rollouts(sessions, publisher, now=T0)
    assert publisher.take() == [Sent("cam-0", fleet.v2, None)]

    # Execute / Assert: cam-2 joins the group and cam-1 leaves it before the next wave is offered
    devices.set_labels(session, "cam-2", {"tier": "beta"})
    devices.set_labels(session, "cam-1", {"tier": None})
    session.commit()
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-0")
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=1))
    assert publisher.take() == [Sent("cam-2", fleet.v2, None)]

    # Execute / Assert: cam-3 joins after the last wave: a wave of its own, then the rollout completes
    devices.set_labels(session, "cam-3", {"tier": "beta"})
    session.commit()
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-2")
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2))
    assert publisher.take() == [Sent("cam-3", fleet.v2, None)]
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-3")
    steps = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=3))

    rollout = rollout_row(sessions, rollout_id)
    assert [s.state for s in steps] == [RolloutState.completed]
    assert (rollout.scope, rollout.selector, rollout.current_wave) == (RolloutScope.selector, "tier=beta", 2)
    assert [stage["size"] for stage in rollout.waves["stages"]] == [1, 2, 1]
    assert targets(sessions, rollout_id) == {
        "cam-0": (0, TargetState.installed),
        "cam-2": (1, TargetState.installed),
        "cam-3": (2, TargetState.installed),
    }
    # the group's model is not the cohort's: cam-1 and cam-4 are left alone
    assert current_model(session, "kitchen") is None
    assert reconcile_desired(sessions, publisher) == 0
    assert (desired(sessions, "cam-1"), desired(sessions, "cam-4")) == (fleet.v1, fleet.v1)


def test_a_selector_rollout_refuses_a_bad_or_empty_selector(session: Session, fleet: Fleet) -> None:
    # Execute / Assert
    with pytest.raises(InvalidValueError, match="label key"):
        start_rollout(session, model_id=fleet.v2, created_by="ops", selector="=beta")
    with pytest.raises(InvalidValueError, match="not both"):
        start_rollout(session, model_id=fleet.v2, created_by="ops", selector="tier", device_ids=["cam-0"])
    with pytest.raises(ConflictError, match="no active device of cohort kitchen matches 'tier=beta'"):
        start_rollout(session, model_id=fleet.v2, created_by="ops", selector="tier=beta")


# --- passes that race or crash ----------------------------------------------------------------------


def test_two_passes_at_once_publish_each_offer_once(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet
) -> None:
    # Prepare: a slow broker, so both passes are inside the wave at the same time if nothing stops them
    started(session, fleet, RolloutPlan(canary=0, waves=1))
    publisher = RecordingPublisher(delay_s=0.1)
    errors: list[BaseException] = []

    def one_pass() -> None:
        try:
            advance_rollouts(sessions, publisher, now=T0)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    # Execute
    threads = [threading.Thread(target=one_pass) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    # Assert
    assert errors == []
    assert sorted(s.device_id for s in publisher.take()) == CAMS


def test_a_pass_that_dies_mid_wave_leaves_nothing_and_the_next_pass_offers_the_wave_again(
    session: Session, sessions: sessionmaker[Session], fleet: Fleet
) -> None:
    # Prepare: the broker goes away after two of the five documents
    rollout_id = started(session, fleet, RolloutPlan(canary=0, waves=1))
    failing = RecordingPublisher(fail_after=2)

    # Execute
    with pytest.raises(ConnectionError):
        advance_rollouts(sessions, failing, now=T0)
    after_crash = targets(sessions, rollout_id)
    state_after_crash = rollout_row(sessions, rollout_id).state
    working = RecordingPublisher()
    advance_rollouts(sessions, working, now=T0 + timedelta(seconds=5))

    # Assert
    assert {state for _, state in after_crash.values()} == {TargetState.pending}
    assert state_after_crash is RolloutState.pending
    assert [s.device_id for s in failing.take()] == ["cam-0", "cam-1"]
    assert sorted(s.device_id for s in working.take()) == CAMS
    assert {state for _, state in targets(sessions, rollout_id).values()} == {TargetState.offered}
