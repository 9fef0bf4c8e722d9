"""Factories for registry rows: plain functions that build real, valid objects for the tests."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy.orm import Session

from cloud.artifacts import ArtifactStore
from cloud.registry import devices, knowledge, models
from cloud.registry.tables import Device, Model, ModelKind, utcnow
from testsupport.registry import knowledge_report, make_manifest

__all__ = ["make_manifest"]  # the tests import it from here too


def make_cohort(session: Session, cohort_id: str = "kitchen") -> str:
    devices.create_cohort(session, cohort_id=cohort_id, description=f"{cohort_id} cameras")
    return cohort_id


def make_device(session: Session, device_id: str, cohort_id: str = "kitchen") -> tuple[Device, str]:
    return devices.provision_device(session, device_id=device_id, cohort_id=cohort_id, labels={"site": "lab"})


def make_cloud_model(
    session: Session, store: ArtifactStore, cohort_id: str = "kitchen", **kwargs: object
) -> Model:
    weights = f"teacher weights {uuid.uuid4()}".encode()
    return models.register_cloud_model(session, store, cohort_id=cohort_id, weights=weights, **kwargs)  # type: ignore[arg-type]


def make_edge_model(
    session: Session, store: ArtifactStore, *, teacher_id: str, cohort_id: str = "kitchen", **kwargs: object
) -> Model:
    version = models.next_version(session, cohort_id=cohort_id, kind=ModelKind.edge)
    blob = f"int8 flatbuffer {uuid.uuid4()}".encode() * 10
    manifest = make_manifest(blob, line=cohort_id, version=version)
    return models.register_edge_model(
        session,
        store,
        model=blob,
        manifest=manifest,
        teacher_id=teacher_id,
        **kwargs,  # type: ignore[arg-type]
    )


def knowledge_payload(device_id: str, base_model_id: str, *, minutes_ago: float = 0) -> bytes:
    """A valid knowledge report from `device_id` against `base_model_id`, as sent over MQTT: the user
    calls class 1 what the model calls 1: "2"."""
    sent_at = utcnow() - timedelta(minutes=minutes_ago)
    return knowledge_report(device_id, base_model_id, sent_at=sent_at, moves={1: 2})


def make_report(session: Session, device_id: str, base_model_id: str) -> uuid.UUID:
    row = knowledge.store_report(session, knowledge_payload(device_id, base_model_id))
    assert row is not None
    return row.msg_id
