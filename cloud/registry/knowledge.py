"""Knowledge reports: stored once per msg_id by the ingest (`received`), consumed by pipeline jobs."""

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Select, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cloud.exceptions import ConflictError, NotFoundError
from cloud.registry.common import paginate
from cloud.registry.devices import get_device
from cloud.registry.models import get_model
from cloud.registry.tables import Device, DeviceStatus, KnowledgeReport, KnowledgeStatus, ModelKind, utcnow
from wire.knowledge import KnowledgeReport as KnowledgePayload


def store_report(
    session: Session, payload: bytes, *, received_at: datetime | None = None
) -> KnowledgeReport | None:
    """Validate and store a knowledge report in state `received`; None if its msg_id is already stored.

    The caller (the ingest) commits, then sends the receipt: a redelivered report is stored once, also
    when two ingests race on it (the insert does nothing on a duplicate msg_id rather than fail).
    """
    report = KnowledgePayload.from_bytes(payload)
    if session.get(KnowledgeReport, report.msg_id) is not None:
        return None
    device = get_device(session, report.device_id)
    if device.status is not DeviceStatus.active:
        raise ConflictError(f"device {device.id} is revoked")
    base = get_model(session, report.base_model_id)
    if base.cohort_id != device.cohort_id:
        raise ConflictError(f"base model {base.id} is not of device {device.id}'s cohort {device.cohort_id}")
    if base.kind is not ModelKind.edge or base.manifest is None:
        raise ConflictError(f"base model {base.id} is not an edge model")
    manifest = base.manifest
    if (report.num_classes, report.feature_dim) != (manifest["num_classes"], manifest["feature_dim"]):
        raise ConflictError(
            f"report shapes C={report.num_classes}, D={report.feature_dim} do not fit {base.id} "
            f"(C={manifest['num_classes']}, D={manifest['feature_dim']})"
        )
    values = {
        "msg_id": report.msg_id,
        "device_id": report.device_id,
        "base_model_id": report.base_model_id,
        "schema": report.schema_,
        "size_bytes": len(payload),
        "sample_count": report.sample_count,
        "dp_epsilon": report.privacy.epsilon if report.privacy else None,
        "metrics": report.metrics.model_dump(mode="json") if report.metrics else {},
        "status": KnowledgeStatus.received,
        "status_reason": "",
        "sent_at": report.sent_at,
        "received_at": received_at or utcnow(),
        "payload": payload,
    }
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(KnowledgeReport).values(values).on_conflict_do_nothing(index_elements=["msg_id"])
    if session.execute(statement).rowcount == 0:  # type: ignore[attr-defined]
        return None
    return session.get_one(KnowledgeReport, report.msg_id)


def get_report(session: Session, msg_id: uuid.UUID) -> KnowledgeReport:
    """The report's metadata (the payload column stays unloaded), or NotFoundError."""
    row = session.get(KnowledgeReport, msg_id)
    if row is None:
        raise NotFoundError("knowledge report", msg_id)
    return row


def list_reports(
    session: Session,
    *,
    limit: int,
    offset: int,
    device_id: str | None = None,
    cohort_id: str | None = None,
    status: KnowledgeStatus | None = None,
    job_id: uuid.UUID | None = None,
) -> tuple[Sequence[KnowledgeReport], int]:
    """A page of reports, newest first, filtered, with the total."""
    statement: Select[KnowledgeReport] = select(KnowledgeReport).order_by(
        KnowledgeReport.received_at.desc(), KnowledgeReport.msg_id
    )
    if device_id is not None:
        statement = statement.where(KnowledgeReport.device_id == device_id)
    if cohort_id is not None:
        statement = statement.join(Device, Device.id == KnowledgeReport.device_id).where(
            Device.cohort_id == cohort_id
        )
    if status is not None:
        statement = statement.where(KnowledgeReport.status == status)
    if job_id is not None:
        statement = statement.where(KnowledgeReport.job_id == job_id)
    return paginate(session, statement, limit=limit, offset=offset)


def consume(session: Session, msg_ids: Sequence[uuid.UUID], *, job_id: uuid.UUID) -> list[KnowledgeReport]:
    """Mark `received` reports as consumed by a job (lineage: the job's models were shaped by them)."""
    rows = session.scalars(
        select(KnowledgeReport).where(KnowledgeReport.msg_id.in_(msg_ids)).with_for_update()
    ).all()
    if len(rows) != len(set(msg_ids)):
        raise NotFoundError(
            "knowledge report", ", ".join(sorted(set(map(str, msg_ids)) - {str(r.msg_id) for r in rows}))
        )
    for row in rows:
        if row.status is not KnowledgeStatus.received and row.job_id != job_id:
            raise ConflictError(f"knowledge report {row.msg_id} is already {row.status.value}")
        row.status = KnowledgeStatus.consumed
        row.job_id = job_id
    return list(rows)
