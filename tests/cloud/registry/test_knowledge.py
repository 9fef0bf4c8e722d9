"""Registry knowledge reports: stored once per msg_id, checked against device and cohort, consumed by jobs."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import ConflictError, NotFoundError
from cloud.registry import devices, jobs, knowledge
from cloud.registry.tables import KnowledgeReport, KnowledgeStatus, Model
from tests.cloud.factories import (
    knowledge_payload,
    make_cloud_model,
    make_cohort,
    make_device,
    make_edge_model,
    make_report,
)
from wire import ContractError


def kitchen_edge(session: Session, store: LocalArtifactStore, cohort_id: str = "kitchen") -> Model:
    """A cohort with a teacher and an edge model v1; return the edge model."""
    make_cohort(session, cohort_id)
    teacher = make_cloud_model(session, store, cohort_id)
    return make_edge_model(session, store, teacher_id=teacher.id, cohort_id=cohort_id)


def report_count(session: Session) -> int:
    """How many knowledge reports are stored."""
    return int(session.scalar(select(func.count()).select_from(KnowledgeReport)) or 0)


def test_store_report_keeps_metadata_and_payload(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    edge = kitchen_edge(session, store)
    make_device(session, "cam-a")
    payload = knowledge_payload("cam-a", edge.id)
    received_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    # Execute
    row = knowledge.store_report(session, payload, received_at=received_at)
    session.commit()
    session.expire_all()
    stored = knowledge.get_report(session, uuid.UUID(json.loads(payload)["msg_id"]))

    # Assert
    assert row is not None
    assert stored.status is KnowledgeStatus.received
    assert (stored.device_id, stored.base_model_id) == ("cam-a", edge.id)
    assert stored.schema == "diredi.knowledge/1"
    assert stored.size_bytes == len(payload)
    assert stored.sample_count == 40
    assert stored.payload == payload
    assert stored.received_at == received_at and stored.received_at.tzinfo is not None
    assert stored.sent_at.tzinfo is not None
    assert stored.job_id is None


def test_store_report_is_idempotent_by_msg_id(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    edge = kitchen_edge(session, store)
    make_device(session, "cam-a")
    payload = knowledge_payload("cam-a", edge.id)
    first = knowledge.store_report(session, payload)
    session.commit()

    # Execute
    second = knowledge.store_report(session, payload)
    session.commit()

    # Assert
    assert first is not None
    assert second is None
    assert report_count(session) == 1


def test_a_revoked_device_cannot_report(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    edge = kitchen_edge(session, store)
    make_device(session, "cam-a")
    devices.revoke_device(session, "cam-a")

    # Execute / Assert
    with pytest.raises(ConflictError, match="revoked"):
        knowledge.store_report(session, knowledge_payload("cam-a", edge.id))
    assert report_count(session) == 0


def test_a_base_model_of_another_cohort_is_refused(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    kitchen_edge(session, store)
    hall = kitchen_edge(session, store, "hall")
    make_device(session, "cam-a")

    # Execute / Assert
    with pytest.raises(ConflictError, match="cohort"):
        knowledge.store_report(session, knowledge_payload("cam-a", hall.id))
    assert report_count(session) == 0


def test_unknown_device_or_base_model_is_not_found(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    edge = kitchen_edge(session, store)
    make_device(session, "cam-a")

    # Execute / Assert
    with pytest.raises(NotFoundError):
        knowledge.store_report(session, knowledge_payload("cam-zz", edge.id))
    with pytest.raises(NotFoundError):
        knowledge.store_report(session, knowledge_payload("cam-a", "kitchen.v9"))


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"{}",
        b'{"schema": "diredi.knowledge/1"}',
        b"x" * (256 * 1024 + 1),
    ],
)
def test_an_invalid_payload_is_a_contract_error(
    session: Session, store: LocalArtifactStore, payload: bytes
) -> None:
    # Prepare
    kitchen_edge(session, store)
    make_device(session, "cam-a")

    # Execute / Assert
    with pytest.raises(ContractError):
        knowledge.store_report(session, payload)
    assert report_count(session) == 0


def test_a_report_with_a_bad_field_names_it(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    edge = kitchen_edge(session, store)
    make_device(session, "cam-a")
    document = json.loads(knowledge_payload("cam-a", edge.id))
    document["sample_count"] = 0

    # Execute / Assert
    with pytest.raises(ContractError, match="sample_count"):
        knowledge.store_report(session, json.dumps(document).encode())


def test_consume_marks_reports_with_the_job(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    edge = kitchen_edge(session, store)
    make_device(session, "cam-a")
    make_device(session, "cam-b")
    ids = [make_report(session, "cam-a", edge.id), make_report(session, "cam-b", edge.id)]
    untouched = make_report(session, "cam-a", edge.id)
    job = jobs.create_job(session, type="rd_update", cohort_id="kitchen")

    # Execute
    consumed = knowledge.consume(session, ids, job_id=job.id)
    again = knowledge.consume(session, ids, job_id=job.id)  # a retried task consumes the same reports
    session.commit()

    # Assert
    assert {r.msg_id for r in consumed} == set(ids) == {r.msg_id for r in again}
    listed, total = knowledge.list_reports(session, limit=10, offset=0, job_id=job.id)
    assert {r.msg_id for r in listed} == set(ids) and total == 2
    assert all(r.status is KnowledgeStatus.consumed for r in listed)
    assert knowledge.get_report(session, untouched).status is KnowledgeStatus.received


def test_consume_refuses_reports_another_job_took(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    edge = kitchen_edge(session, store)
    make_device(session, "cam-a")
    msg_id = make_report(session, "cam-a", edge.id)
    first = jobs.create_job(session, type="rd_update", cohort_id="kitchen")
    second = jobs.create_job(session, type="rd_update", cohort_id="kitchen")
    knowledge.consume(session, [msg_id], job_id=first.id)

    # Execute / Assert
    with pytest.raises(ConflictError, match="already consumed"):
        knowledge.consume(session, [msg_id], job_id=second.id)
    assert knowledge.get_report(session, msg_id).job_id == first.id


def test_consume_of_an_unknown_report_is_not_found(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    edge = kitchen_edge(session, store)
    make_device(session, "cam-a")
    known = make_report(session, "cam-a", edge.id)
    unknown = uuid.uuid4()
    job = jobs.create_job(session, type="rd_update")

    # Execute / Assert
    with pytest.raises(NotFoundError, match=str(unknown)):
        knowledge.consume(session, [known, unknown], job_id=job.id)


def test_list_reports_filters_and_orders_newest_first(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    edge = kitchen_edge(session, store)
    hall = kitchen_edge(session, store, "hall")
    make_device(session, "cam-a")
    make_device(session, "hall-1", "hall")
    now = datetime.now(UTC)
    old = knowledge.store_report(
        session, knowledge_payload("cam-a", edge.id), received_at=now - timedelta(hours=2)
    )
    new = knowledge.store_report(session, knowledge_payload("cam-a", edge.id), received_at=now)
    knowledge.store_report(session, knowledge_payload("hall-1", hall.id), received_at=now)
    assert old is not None and new is not None
    session.commit()

    # Execute
    kitchen, kitchen_total = knowledge.list_reports(session, limit=10, offset=0, cohort_id="kitchen")
    by_device, _ = knowledge.list_reports(session, limit=1, offset=1, device_id="cam-a")
    received, received_total = knowledge.list_reports(
        session, limit=10, offset=0, status=KnowledgeStatus.received
    )

    # Assert
    assert [r.msg_id for r in kitchen] == [new.msg_id, old.msg_id] and kitchen_total == 2
    assert [r.msg_id for r in by_device] == [old.msg_id]
    assert received_total == 3 and len(received) == 3
