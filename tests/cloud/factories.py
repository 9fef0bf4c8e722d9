"""Factories for registry rows: plain functions that build real, valid objects for the tests."""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta

import numpy as np
from sqlalchemy.orm import Session

from cloud.artifacts import ArtifactStore
from cloud.registry import devices, knowledge, models
from cloud.registry.tables import Device, Model, ModelKind, utcnow
from wire.arrays import EncodedArray
from wire.knowledge import KnowledgeReport
from wire.manifest import ArtifactManifest, ProbeOutput, TensorSpec

NUM_CLASSES, FEATURE_DIM = 4, 3


def make_manifest(blob: bytes, *, line: str, version: int) -> ArtifactManifest:
    """A valid manifest for `blob` (the registry checks the manifest, not the flatbuffer inside)."""
    rng = np.random.default_rng(version)
    c, d = NUM_CLASSES, FEATURE_DIM
    probe = ProbeOutput(
        input=EncodedArray.from_numpy(rng.normal(size=(1, 8)), "float32"),
        features=EncodedArray.from_numpy(rng.integers(-128, 127, size=(1, d)), "int8"),
        logits=EncodedArray.from_numpy(rng.integers(-128, 127, size=(1, c)), "int8"),
    )
    return ArtifactManifest(
        model_id=f"{line}.v{version}",
        line=line,
        version=version,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        signature="serving_default",
        input=TensorSpec(name="x", shape=[1, 8], scale=0.05, zero_point=-3),
        features=TensorSpec(name="features", shape=[1, d], scale=0.1, zero_point=0),
        logits=TensorSpec(name="logits", shape=[1, c], scale=0.2, zero_point=1),
        num_classes=c,
        feature_dim=d,
        head_weight=EncodedArray.from_numpy(rng.normal(size=(c, d)), "float32"),
        head_bias=EncodedArray.from_numpy(np.zeros(c), "float32"),
        probes=[probe],
    )


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
    """A valid knowledge report from `device_id` against `base_model_id`, as sent over MQTT."""
    c, d = NUM_CLASSES, FEATURE_DIM
    counts = np.eye(c, dtype=np.int32) * 10
    counts[1, 1], counts[1, 2] = 0, 10  # the user calls class 1 what the model calls 1: "2"
    report = KnowledgeReport(
        device_id=device_id,
        sent_at=utcnow() - timedelta(minutes=minutes_ago),
        base_model_id=base_model_id,
        num_classes=c,
        feature_dim=d,
        sample_count=int(counts.sum()),
        preference_map=EncodedArray.from_numpy(counts, "int32"),
        delta_weight=EncodedArray.from_numpy(np.full((c, d), 0.01), "float16"),
        delta_bias=EncodedArray.from_numpy(np.zeros(c), "float16"),
        metrics=None,
    )
    return report.to_bytes()


def make_report(session: Session, device_id: str, base_model_id: str) -> uuid.UUID:
    row = knowledge.store_report(session, knowledge_payload(device_id, base_model_id))
    assert row is not None
    return row.msg_id
