"""Models of a line: registering cloud and edge models with their artifacts, versions, and approval."""

import hashlib
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from cloud.artifacts import ArtifactStore
from cloud.exceptions import ConflictError, NotFoundError
from cloud.registry.common import paginate
from cloud.registry.devices import get_cohort
from cloud.registry.tables import Model, ModelKind, ModelStatus, utcnow
from wire.manifest import ArtifactManifest, edge_model_id

CLOUD_FORMAT = "torch-state-dict"


def cloud_model_id(cohort_id: str, version: int) -> str:
    """The id of a line's cloud (teacher) model; edge models are `wire.manifest.edge_model_id`."""
    return f"{cohort_id}.cloud.v{version}"


def next_version(session: Session, *, cohort_id: str, kind: ModelKind) -> int:
    """The version the line's next model of this kind gets."""
    latest = session.scalar(
        select(func.max(Model.version)).where(Model.cohort_id == cohort_id, Model.kind == kind)
    )
    return int(latest or 0) + 1


def get_model(session: Session, model_id: str, *, for_update: bool = False) -> Model:
    """The model, or NotFoundError; `for_update` locks its row until the transaction ends."""
    model = session.get(Model, model_id, with_for_update=for_update)
    if model is None:
        raise NotFoundError("model", model_id)
    return model


def _add(session: Session, model: Model) -> Model:
    if session.get(Model, model.id) is not None:
        raise ConflictError(f"model {model.id} already exists")
    for role, ref in (("parent", model.parent_id), ("teacher", model.teacher_id)):
        if ref is None:
            continue
        upstream = get_model(session, ref)
        if upstream.cohort_id != model.cohort_id:
            raise ConflictError(f"{role} {ref} is of another line than {model.cohort_id}")
        wanted = ModelKind.cloud if role == "teacher" else model.kind
        if upstream.kind is not wanted:
            raise ConflictError(f"{role} {ref} is not a {wanted.value} model")
    session.add(model)
    session.flush()
    return model


def register_cloud_model(
    session: Session,
    store: ArtifactStore,
    *,
    cohort_id: str,
    weights: bytes,
    parent_id: str | None = None,
    job_id: uuid.UUID | None = None,
    metrics: dict[str, Any] | None = None,
) -> Model:
    """Store a cloud model's weights and register it as the line's next cloud version."""
    get_cohort(session, cohort_id)
    version = next_version(session, cohort_id=cohort_id, kind=ModelKind.cloud)
    sha256 = store.put(weights)
    return _add(
        session,
        Model(
            id=cloud_model_id(cohort_id, version),
            cohort_id=cohort_id,
            kind=ModelKind.cloud,
            version=version,
            parent_id=parent_id,
            format=CLOUD_FORMAT,
            sha256=sha256,
            size=len(weights),
            metrics=metrics or {},
            job_id=job_id,
        ),
    )


def register_edge_model(
    session: Session,
    store: ArtifactStore,
    *,
    model: bytes,
    manifest: ArtifactManifest,
    teacher_id: str,
    parent_id: str | None = None,
    job_id: uuid.UUID | None = None,
    metrics: dict[str, Any] | None = None,
) -> Model:
    """Store an exported int8 edge model and register it under the id and version its manifest names."""
    get_cohort(session, manifest.line)
    expected = next_version(session, cohort_id=manifest.line, kind=ModelKind.edge)
    if manifest.version != expected:
        raise ConflictError(f"line {manifest.line} expects edge version {expected}, not {manifest.version}")
    expected_id = edge_model_id(manifest.line, manifest.version)
    if manifest.model_id != expected_id:
        raise ConflictError(f"manifest names model {manifest.model_id}, not {expected_id}")
    sha256 = hashlib.sha256(model).hexdigest()
    if sha256 != manifest.sha256 or len(model) != manifest.size:
        raise ConflictError(f"artifact does not match its manifest (sha256 {sha256[:12]}…, {len(model)} B)")
    store.put(model)
    return _add(
        session,
        Model(
            id=manifest.model_id,
            cohort_id=manifest.line,
            kind=ModelKind.edge,
            version=manifest.version,
            parent_id=parent_id,
            teacher_id=teacher_id,
            format=manifest.format,
            sha256=sha256,
            size=manifest.size,
            manifest=manifest.model_dump(mode="json", by_alias=True),
            metrics=metrics or {},
            job_id=job_id,
        ),
    )


def decide(session: Session, model_id: str, *, approve: bool, reason: str = "") -> Model:
    """Approve or reject a candidate; approving retires nothing (rollouts decide what runs where)."""
    model = get_model(session, model_id, for_update=True)  # decisions on one model are serialised
    if model.status is not ModelStatus.candidate:
        raise ConflictError(f"model {model_id} is {model.status.value}, not a candidate")
    model.status = ModelStatus.approved if approve else ModelStatus.rejected
    model.status_reason = reason
    model.decided_at = utcnow()
    return model


def retire(session: Session, model_id: str, *, reason: str = "") -> Model:
    """Retire an approved model so no new rollout uses it."""
    model = get_model(session, model_id, for_update=True)  # decisions on one model are serialised
    if model.status is not ModelStatus.approved:
        raise ConflictError(f"model {model_id} is {model.status.value}; only approved models are retired")
    model.status = ModelStatus.retired
    model.status_reason = reason
    model.decided_at = utcnow()
    return model


def list_models(
    session: Session,
    *,
    limit: int,
    offset: int,
    cohort_id: str | None = None,
    kind: ModelKind | None = None,
    status: ModelStatus | None = None,
) -> tuple[Sequence[Model], int]:
    """A page of models, newest version first within each line, filtered, with the total."""
    statement: Select[Model] = select(Model).order_by(Model.cohort_id, Model.kind, Model.version.desc())
    if cohort_id is not None:
        statement = statement.where(Model.cohort_id == cohort_id)
    if kind is not None:
        statement = statement.where(Model.kind == kind)
    if status is not None:
        statement = statement.where(Model.status == status)
    return paginate(session, statement, limit=limit, offset=offset)


def edge_manifest(model: Model) -> ArtifactManifest:
    """The manifest of an edge model, as stored at registration."""
    if model.kind is not ModelKind.edge or model.manifest is None:
        raise ConflictError(f"model {model.id} is not an edge model with a manifest")
    return ArtifactManifest.model_validate(model.manifest)


class ModelCache:
    """Models by id, each read once per session (a rollout pass reads the same few many times)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._models: dict[str, Model | None] = {}

    def get(self, model_id: str | None) -> Model | None:
        if model_id is None:
            return None
        if model_id not in self._models:
            self._models[model_id] = self.session.get(Model, model_id)
        return self._models[model_id]

    def manifest(self, model_id: str | None) -> ArtifactManifest | None:
        """The manifest of an edge model, or None (no model, or not an edge model)."""
        model = self.get(model_id)
        if model is None or model.kind is not ModelKind.edge or model.manifest is None:
            return None
        return edge_manifest(model)

    def rollback_of(self, target: Model, running_id: str | None) -> str | None:
        """The running model when `target` is an older version of its line (a device refuses a
        downgrade that does not say which model it rolls back), else None."""
        running = self.get(running_id)
        if running is None or running.cohort_id != target.cohort_id or running.kind is not target.kind:
            return None
        return running.id if running.version > target.version else None
