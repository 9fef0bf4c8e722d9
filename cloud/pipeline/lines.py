"""A model line version in the registry: the cloud model (teacher + float student) and its int8 edge model."""

from __future__ import annotations

import io
import json
import pickle  # noqa: S403 - only for the error torch.load(weights_only=True) raises
import uuid
from typing import TYPE_CHECKING, Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import ArtifactStore
from cloud.exceptions import ConflictError, ExportGaveUp, FamilyError, RegistryError
from cloud.ml.export import MAX_INT8_DROP, EdgeArtifact
from cloud.ml.families import NetSpec
from cloud.ml.line import EdgeLine, StageProgress
from cloud.ml.nets import EdgeStudent
from cloud.pipeline.scheduling import TRAINING_DATA
from cloud.registry import models
from cloud.registry.tables import Model, ModelKind

if TYPE_CHECKING:
    from cloud.ml.scenario import Scenario

WEIGHTS_FORMAT = 2  # 1: the MLP pair only, its spec {side, num_classes, hidden, feature_dim}


def pack_cloud_weights(line: EdgeLine, spec: NetSpec) -> bytes:
    """The cloud model's bytes: the net spec (family, input shape, classes) and the teacher's and float
    student's state dicts."""
    buffer = io.BytesIO()
    torch.save(
        {
            "format": WEIGHTS_FORMAT,
            "spec": spec.as_dict(),
            "teacher": line.teacher.state_dict(),
            "student": line.student.state_dict(),
        },
        buffer,
    )
    return buffer.getvalue()


def unpack_cloud_weights(data: bytes) -> tuple[NetSpec, torch.nn.Module, EdgeStudent]:
    """Rebuild the nets from `pack_cloud_weights` bytes (tensors only: nothing is unpickled as code;
    the family's factory builds the modules)."""
    try:
        content: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True)
        if content.get("format") not in (1, WEIGHTS_FORMAT):
            raise ValueError(f"unknown weights format {content.get('format')!r}")
        spec = NetSpec.from_dict(content["spec"])
        teacher, student = spec.build()
        teacher.load_state_dict(content["teacher"])
        student.load_state_dict(content["student"])
    except (
        pickle.UnpicklingError,
        EOFError,
        RuntimeError,
        ValueError,
        KeyError,
        TypeError,
        FamilyError,
    ) as exc:
        raise RegistryError(f"cloud model weights are unreadable: {exc}") from None
    return spec, teacher.eval(), student.eval()


def register_line(
    session: Session,
    store: ArtifactStore,
    line: EdgeLine,
    spec: NetSpec,
    *,
    job_id: uuid.UUID | None = None,
    parent: Model | None = None,
    metrics: dict[str, Any] | None = None,
) -> tuple[Model, Model]:
    """Register a line version: its cloud model (child of the parent's teacher) and its edge model."""
    parent_cloud = parent.teacher_id if parent is not None else None
    cloud = models.register_cloud_model(
        session,
        store,
        cohort_id=line.line,
        weights=pack_cloud_weights(line, spec),
        parent_id=parent_cloud,
        job_id=job_id,
        metrics=metrics,
    )
    edge = models.register_edge_model(
        session,
        store,
        model=line.artifact.model,
        manifest=line.artifact.manifest,
        teacher_id=cloud.id,
        parent_id=parent.id if parent is not None else None,
        job_id=job_id,
        metrics=metrics,
    )
    return cloud, edge


def load_line(session: Session, store: ArtifactStore, edge_model_id: str) -> tuple[EdgeLine, NetSpec]:
    """The line version of a registered edge model, rebuilt from the artifact store."""
    edge = models.get_model(session, edge_model_id)
    if edge.kind is not ModelKind.edge or edge.teacher_id is None:
        raise RegistryError(f"{edge_model_id} is not an edge model with a teacher")
    cloud = models.get_model(session, edge.teacher_id)
    spec, teacher, student = unpack_cloud_weights(store.get(cloud.sha256))
    artifact = EdgeArtifact(model=store.get(edge.sha256), manifest=models.edge_manifest(edge))
    return EdgeLine(edge.cohort_id, edge.version, teacher, student, artifact), spec


def bootstrap_line(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    *,
    cohort_id: str,
    scenario: Scenario,
    progress: StageProgress,
    max_int8_drop: float = MAX_INT8_DROP,
) -> tuple[str, str]:
    """Train a cohort's first version on a scenario's presumed data (KD, int8 export, accuracy check)
    and register it as a candidate, with the job that made it; return the cloud and edge model ids.
    The scenario's family (or the built-in one for its data's shape) is checked against the contract
    first (FamilyError).

    The job is committed before training and the models after it: no transaction (and no SQLite
    write lock) is held while the model trains, and a failed training leaves a failed job behind
    (with the export's attempts in its result when no int8 export kept within `max_int8_drop`).
    """
    from cloud.ml.data import build_scenario_data
    from cloud.ml.datasources import describe_source
    from cloud.ml.export import int8_accuracy
    from cloud.ml.families import check_family, default_family
    from cloud.ml.line import plan_for, train_line
    from cloud.registry import jobs
    from cloud.registry.db import transaction
    from cloud.registry.devices import get_cohort
    from cloud.registry.tables import JobState

    with transaction(sessions) as session:
        get_cohort(session, cohort_id)
        if models.next_version(session, cohort_id=cohort_id, kind=ModelKind.edge) != 1:
            raise ConflictError(
                f"cohort {cohort_id} already has a model line; its next versions come from RD cycles "
                "(a line of other data or another family starts in a cohort of its own)"
            )
        job_id = jobs.create_job(
            session,
            type="bootstrap",
            cohort_id=cohort_id,
            params={
                "scenario": scenario.name,
                "seed": scenario.seed,
                "data": describe_source(scenario.dataset),
                "family": scenario.family,
            },
        ).id
        jobs.report_progress(session, job_id, progress=0.0, stage="train")
    try:
        data = build_scenario_data(scenario)
        spec = NetSpec(
            scenario.family or default_family(data.input_shape), data.input_shape, data.num_classes
        )
        check_family(spec, data.train.x[:64])
        line = train_line(
            data.train,
            spec,
            plan_for(spec, scenario.seed, max_int8_drop),
            line=cohort_id,
            val=data.val,
            pixel_scale=data.pixel_scale,
            progress=progress,
        )
        float_acc, int8_acc = int8_accuracy(line.artifact, line.student, data.val)
        metrics = {"val_float_acc": float_acc, "val_int8_acc": int8_acc, "val_size": len(data.val.y)}
        with transaction(sessions) as session:
            cloud, edge = register_line(session, store, line, spec, job_id=job_id, metrics=metrics)
            # What the cohort's RD cycles take their transfer and validation data from.
            cloud.metrics = {**metrics, TRAINING_DATA: json.loads(scenario.model_dump_json())}
            result = {"models": [cloud.id, edge.id], **metrics, "export": [a.as_dict() for a in line.export]}
            jobs.finish(session, job_id, state=JobState.succeeded, result=result)
            return cloud.id, edge.id
    except Exception as exc:
        failed = {"export": [a.as_dict() for a in exc.attempts]} if isinstance(exc, ExportGaveUp) else None
        with transaction(sessions) as session:
            jobs.finish(
                session,
                job_id,
                state=JobState.failed,
                result=failed,
                error=f"{type(exc).__name__}: {exc}"[:2000],
            )
        raise
