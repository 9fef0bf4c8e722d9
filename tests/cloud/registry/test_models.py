"""Registry models: versions per line and kind, manifest checks, teachers, the approval state machine."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import ConflictError, NotFoundError
from cloud.registry import models
from cloud.registry.tables import Model, ModelKind, ModelStatus
from tests.cloud.factories import make_cloud_model, make_cohort, make_edge_model, make_manifest

BLOB = b"an int8 flatbuffer, in a test" * 20


def model_count(session: Session) -> int:
    """How many models the registry holds."""
    return int(session.scalar(select(func.count()).select_from(Model)) or 0)


def test_versions_count_per_line_and_kind(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    make_cohort(session, "hall")

    # Execute
    kitchen_1 = make_cloud_model(session, store)
    kitchen_2 = make_cloud_model(session, store, parent_id=kitchen_1.id)
    edge_1 = make_edge_model(session, store, teacher_id=kitchen_2.id)
    edge_2 = make_edge_model(session, store, teacher_id=kitchen_2.id, parent_id=edge_1.id)
    hall_1 = make_cloud_model(session, store, "hall")
    hall_edge_1 = make_edge_model(session, store, teacher_id=hall_1.id, cohort_id="hall")

    # Assert
    assert [
        (m.id, m.kind, m.version) for m in (kitchen_1, kitchen_2, edge_1, edge_2, hall_1, hall_edge_1)
    ] == [
        ("kitchen.cloud.v1", ModelKind.cloud, 1),
        ("kitchen.cloud.v2", ModelKind.cloud, 2),
        ("kitchen.v1", ModelKind.edge, 1),
        ("kitchen.v2", ModelKind.edge, 2),
        ("hall.cloud.v1", ModelKind.cloud, 1),
        ("hall.v1", ModelKind.edge, 1),
    ]
    assert models.next_version(session, cohort_id="kitchen", kind=ModelKind.edge) == 3
    assert models.next_version(session, cohort_id="porch", kind=ModelKind.cloud) == 1
    assert models.cloud_model_id("kitchen", 2) == kitchen_2.id


def test_a_cloud_model_stores_its_weights(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    weights = b"teacher state dict bytes"

    # Execute
    model = models.register_cloud_model(
        session, store, cohort_id="kitchen", weights=weights, metrics={"acc": 1}
    )

    # Assert
    assert model.sha256 == hashlib.sha256(weights).hexdigest()
    assert model.size == len(weights)
    assert model.format == models.CLOUD_FORMAT
    assert model.status is ModelStatus.candidate
    assert model.manifest is None
    assert store.get(model.sha256) == weights


def test_an_edge_model_stores_its_artifact_and_manifest(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    teacher = make_cloud_model(session, store)
    manifest = make_manifest(BLOB, line="kitchen", version=1)

    # Execute
    model = models.register_edge_model(session, store, model=BLOB, manifest=manifest, teacher_id=teacher.id)
    session.commit()
    session.expire_all()
    stored = models.get_model(session, "kitchen.v1")

    # Assert
    assert (model.id, model.teacher_id, model.parent_id) == ("kitchen.v1", teacher.id, None)
    assert store.get(stored.sha256) == BLOB
    assert models.edge_manifest(stored) == manifest


def test_an_edge_model_of_an_unknown_line_is_not_found(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    manifest = make_manifest(BLOB, line="nowhere", version=1)

    # Execute / Assert
    with pytest.raises(NotFoundError):
        models.register_edge_model(session, store, model=BLOB, manifest=manifest, teacher_id="x")


@pytest.mark.parametrize("version", [2, 3])
def test_an_edge_manifest_must_name_the_next_version(
    session: Session, store: LocalArtifactStore, version: int
) -> None:
    # Prepare
    make_cohort(session)
    teacher = make_cloud_model(session, store)
    manifest = make_manifest(BLOB, line="kitchen", version=version)

    # Execute / Assert
    with pytest.raises(ConflictError, match="expects edge version 1"):
        models.register_edge_model(session, store, model=BLOB, manifest=manifest, teacher_id=teacher.id)
    assert model_count(session) == 1


def test_an_edge_version_cannot_be_registered_twice(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    teacher = make_cloud_model(session, store)
    make_edge_model(session, store, teacher_id=teacher.id)
    again = make_manifest(BLOB, line="kitchen", version=1)

    # Execute / Assert
    with pytest.raises(ConflictError, match="expects edge version 2"):
        models.register_edge_model(session, store, model=BLOB, manifest=again, teacher_id=teacher.id)


def test_an_edge_artifact_must_match_its_manifest(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    teacher = make_cloud_model(session, store)
    manifest = make_manifest(BLOB, line="kitchen", version=1)
    wrong_sha = manifest.model_copy(update={"sha256": hashlib.sha256(b"other").hexdigest()})
    wrong_size = manifest.model_copy(update={"size": len(BLOB) + 1})

    # Execute / Assert
    for bad in (wrong_sha, wrong_size):
        with pytest.raises(ConflictError, match="does not match its manifest"):
            models.register_edge_model(session, store, model=BLOB, manifest=bad, teacher_id=teacher.id)
    with pytest.raises(ConflictError, match="does not match its manifest"):
        models.register_edge_model(
            session, store, model=BLOB + b"!", manifest=manifest, teacher_id=teacher.id
        )
    assert model_count(session) == 1


def test_a_teacher_must_be_an_existing_cloud_model(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    teacher = make_cloud_model(session, store)
    edge = make_edge_model(session, store, teacher_id=teacher.id)
    manifest = make_manifest(BLOB, line="kitchen", version=2)

    # Execute / Assert
    with pytest.raises(ConflictError, match="not a cloud model"):
        models.register_edge_model(session, store, model=BLOB, manifest=manifest, teacher_id=edge.id)
    with pytest.raises(NotFoundError):
        models.register_edge_model(
            session, store, model=BLOB, manifest=manifest, teacher_id="kitchen.cloud.v9"
        )
    with pytest.raises(NotFoundError):
        make_cloud_model(session, store, parent_id="kitchen.cloud.v9")


def test_approve_then_retire(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    teacher = make_cloud_model(session, store)
    edge = make_edge_model(session, store, teacher_id=teacher.id)

    # Execute
    approved = models.decide(session, edge.id, approve=True, reason="gate passed")
    approved_at = approved.decided_at
    retired = models.retire(session, edge.id, reason="superseded")

    # Assert
    assert approved_at is not None and approved_at.tzinfo is not None
    assert retired.status is ModelStatus.retired
    assert retired.status_reason == "superseded"
    assert retired.decided_at is not None and retired.decided_at >= approved_at


def test_reject_records_the_reason(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    teacher = make_cloud_model(session, store)
    edge = make_edge_model(session, store, teacher_id=teacher.id)

    # Execute
    rejected = models.decide(session, edge.id, approve=False, reason="untouched classes dropped 3 points")

    # Assert
    assert rejected.status is ModelStatus.rejected
    assert rejected.status_reason == "untouched classes dropped 3 points"


@pytest.mark.parametrize(
    ("path", "action"),
    [
        (["approve"], "approve"),
        (["approve"], "reject"),
        (["reject"], "approve"),
        (["reject"], "retire"),
        ([], "retire"),
        (["approve", "retire"], "retire"),
        (["approve", "retire"], "approve"),
    ],
)
def test_decisions_out_of_order_are_conflicts(
    session: Session, store: LocalArtifactStore, path: list[str], action: str
) -> None:
    # Prepare
    make_cohort(session)
    model = make_cloud_model(session, store)
    steps = {
        "approve": lambda: models.decide(session, model.id, approve=True),
        "reject": lambda: models.decide(session, model.id, approve=False),
        "retire": lambda: models.retire(session, model.id),
    }
    for step in path:
        steps[step]()
    before = model.status

    # Execute / Assert
    with pytest.raises(ConflictError):
        steps[action]()
    assert model.status is before


def test_decisions_on_an_unknown_model_are_not_found(session: Session) -> None:
    # Execute / Assert
    with pytest.raises(NotFoundError):
        models.decide(session, "kitchen.v9", approve=True)
    with pytest.raises(NotFoundError):
        models.retire(session, "kitchen.v9")


def test_list_models_filters_and_orders_newest_first(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    make_cohort(session, "hall")
    teacher = make_cloud_model(session, store)
    for _ in range(3):
        make_edge_model(session, store, teacher_id=teacher.id)
    make_cloud_model(session, store, "hall")
    models.decide(session, "kitchen.v2", approve=True)

    # Execute
    edges, edge_total = models.list_models(
        session, limit=2, offset=0, cohort_id="kitchen", kind=ModelKind.edge
    )
    approved, approved_total = models.list_models(session, limit=10, offset=0, status=ModelStatus.approved)
    everything, total = models.list_models(session, limit=10, offset=0)

    # Assert
    assert [m.id for m in edges] == ["kitchen.v3", "kitchen.v2"] and edge_total == 3
    assert [m.id for m in approved] == ["kitchen.v2"] and approved_total == 1
    assert total == 5
    assert [m.id for m in everything] == [
        "hall.cloud.v1",
        "kitchen.cloud.v1",
        "kitchen.v3",
        "kitchen.v2",
        "kitchen.v1",
    ]


def test_edge_manifest_of_a_cloud_model_is_a_conflict(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    teacher = make_cloud_model(session, store)

    # Execute / Assert
    with pytest.raises(ConflictError):
        models.edge_manifest(teacher)


@pytest.mark.parametrize("model_id", ["hall.v1", "kitchen.cloud.v2", "kitchen.v7"])
def test_an_edge_manifest_must_name_its_own_line_and_version(
    session: Session, store: LocalArtifactStore, model_id: str
) -> None:
    # Prepare: a manifest of kitchen v1 whose model_id names another model; registered as it is, it
    # would take that id from its real owner (hall's v1 or kitchen's next teacher could never register)
    make_cohort(session)
    make_cohort(session, "hall")
    teacher = make_cloud_model(session, store)
    manifest = make_manifest(BLOB, line="kitchen", version=1).model_copy(update={"model_id": model_id})

    # Execute / Assert
    with pytest.raises(ConflictError):
        models.register_edge_model(session, store, model=BLOB, manifest=manifest, teacher_id=teacher.id)
    assert session.get(Model, model_id) is None
