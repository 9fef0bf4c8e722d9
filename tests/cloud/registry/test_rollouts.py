"""Registry rollouts: only approved edge models, only the cohort's devices, one wave each, and progress."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.orm import Session

from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import ConflictError, NotFoundError
from cloud.registry import models, rollouts
from cloud.registry.tables import Model, RolloutState, RolloutTarget, TargetState
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model


def edge_of(
    session: Session, store: LocalArtifactStore, *, approve: bool | None, cohort_id: str = "kitchen"
) -> Model:
    """A new edge model of the line: a candidate (None), approved (True) or rejected (False)."""
    teacher = make_cloud_model(session, store, cohort_id)
    edge = make_edge_model(session, store, teacher_id=teacher.id, cohort_id=cohort_id)
    if approve is not None:
        models.decide(session, edge.id, approve=approve)
    return edge


def kitchen_with_devices(session: Session, *names: str) -> None:
    """The kitchen cohort and the named devices in it."""
    make_cohort(session)
    for name in names:
        make_device(session, name)


def test_a_rollout_plans_its_waves(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    kitchen_with_devices(session, "cam-a", "cam-b", "cam-c")
    edge = edge_of(session, store, approve=True)

    # Execute
    rollout = rollouts.create_rollout(
        session,
        model_id=edge.id,
        waves=[["cam-a"], ["cam-b", "cam-c"]],
        created_by="ops",
        plan={"halt_failed": 1},
    )
    session.commit()
    targets, total = rollouts.list_targets(session, rollout.id, limit=10, offset=0)

    # Assert
    assert (rollout.cohort_id, rollout.model_id, rollout.state) == ("kitchen", edge.id, RolloutState.pending)
    assert rollout.waves == {"halt_failed": 1}
    assert [(t.wave, t.device_id, t.state) for t in targets] == [
        (0, "cam-a", TargetState.pending),
        (1, "cam-b", TargetState.pending),
        (1, "cam-c", TargetState.pending),
    ]
    assert total == 3


def test_only_an_approved_edge_model_rolls_out(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    kitchen_with_devices(session, "cam-a")
    candidate = edge_of(session, store, approve=None)
    rejected = edge_of(session, store, approve=False)
    retired = edge_of(session, store, approve=True)
    models.retire(session, retired.id)
    teacher = make_cloud_model(session, store)
    models.decide(session, teacher.id, approve=True)

    # Execute / Assert
    for model in (candidate, rejected, retired, teacher):
        with pytest.raises(ConflictError, match="not an approved edge model"):
            rollouts.create_rollout(session, model_id=model.id, waves=[["cam-a"]], created_by="ops")
    with pytest.raises(NotFoundError):
        rollouts.create_rollout(session, model_id="kitchen.v9", waves=[["cam-a"]], created_by="ops")


def test_devices_must_be_in_the_models_cohort(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    kitchen_with_devices(session, "cam-a")
    make_cohort(session, "hall")
    make_device(session, "hall-1", "hall")
    edge = edge_of(session, store, approve=True)

    # Execute / Assert
    with pytest.raises(ConflictError, match="not in cohort kitchen"):
        rollouts.create_rollout(session, model_id=edge.id, waves=[["cam-a"], ["hall-1"]], created_by="ops")
    with pytest.raises(NotFoundError):
        rollouts.create_rollout(session, model_id=edge.id, waves=[["cam-zz"]], created_by="ops")


def test_no_device_is_in_two_waves(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    kitchen_with_devices(session, "cam-a", "cam-b")
    edge = edge_of(session, store, approve=True)

    # Execute / Assert
    with pytest.raises(ConflictError, match="two waves"):
        rollouts.create_rollout(
            session, model_id=edge.id, waves=[["cam-a"], ["cam-b", "cam-a"]], created_by="ops"
        )
    with pytest.raises(ConflictError, match="two waves"):
        rollouts.create_rollout(session, model_id=edge.id, waves=[["cam-b", "cam-b"]], created_by="ops")


def test_target_counts_per_rollout_and_state(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    kitchen_with_devices(session, "cam-a", "cam-b", "cam-c", "cam-d")
    edge = edge_of(session, store, approve=True)
    first = rollouts.create_rollout(
        session, model_id=edge.id, waves=[["cam-a"], ["cam-b", "cam-c"]], created_by="ops"
    )
    second = rollouts.create_rollout(session, model_id=edge.id, waves=[["cam-d"]], created_by="ops")
    session.get_one(RolloutTarget, (first.id, "cam-a")).state = TargetState.installed
    session.get_one(RolloutTarget, (first.id, "cam-b")).state = TargetState.failed
    session.commit()
    nothing = uuid.uuid4()

    # Execute
    counts = rollouts.target_counts(session, [first.id, second.id, nothing])

    # Assert
    zero = {state.value: 0 for state in TargetState}
    assert counts[first.id] == {**zero, "installed": 1, "failed": 1, "pending": 1}
    assert counts[second.id] == {**zero, "pending": 1}
    assert counts[nothing] == zero


def test_list_rollouts_filters_with_totals(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    kitchen_with_devices(session, "cam-a")
    make_cohort(session, "hall")
    make_device(session, "hall-1", "hall")
    edge = edge_of(session, store, approve=True)
    hall = edge_of(session, store, approve=True, cohort_id="hall")
    kitchen = rollouts.create_rollout(session, model_id=edge.id, waves=[["cam-a"]], created_by="ops")
    rollouts.create_rollout(session, model_id=hall.id, waves=[["hall-1"]], created_by="ops")
    kitchen.state = RolloutState.running
    session.commit()

    # Execute
    by_cohort, cohort_total = rollouts.list_rollouts(session, limit=10, offset=0, cohort_id="kitchen")
    running, running_total = rollouts.list_rollouts(session, limit=10, offset=0, state=RolloutState.running)
    _, total = rollouts.list_rollouts(session, limit=1, offset=0)

    # Assert
    assert [r.id for r in by_cohort] == [kitchen.id] and cohort_total == 1
    assert [r.id for r in running] == [kitchen.id] and running_total == 1
    assert total == 2
    assert rollouts.get_rollout(session, kitchen.id).model_id == edge.id
    with pytest.raises(NotFoundError):
        rollouts.get_rollout(session, uuid.uuid4())
