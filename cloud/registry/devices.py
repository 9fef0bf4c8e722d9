"""Cohorts and devices: provisioning with one-time credentials, revocation, lookup, artifact offers."""

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, and_, exists, or_, select
from sqlalchemy.orm import Session

from cloud.exceptions import ConflictError, NotFoundError
from cloud.registry.common import hash_secret, new_secret, paginate, paginate_rows, secret_matches
from cloud.registry.tables import (
    Cohort,
    Device,
    DeviceStatus,
    Model,
    ModelKind,
    Presence,
    Rollout,
    RolloutTarget,
    TargetState,
    utcnow,
)


def create_cohort(session: Session, *, cohort_id: str, description: str = "") -> Cohort:
    """A new cohort (model line); its id must be new."""
    if session.get(Cohort, cohort_id) is not None:
        raise ConflictError(f"cohort {cohort_id} already exists")
    cohort = Cohort(id=cohort_id, description=description)
    session.add(cohort)
    session.flush()
    return cohort


def get_cohort(session: Session, cohort_id: str) -> Cohort:
    """The cohort, or NotFoundError."""
    cohort = session.get(Cohort, cohort_id)
    if cohort is None:
        raise NotFoundError("cohort", cohort_id)
    return cohort


def list_cohorts(session: Session, *, limit: int, offset: int) -> tuple[Sequence[Cohort], int]:
    """A page of cohorts by id, with the total."""
    return paginate(session, select(Cohort).order_by(Cohort.id), limit=limit, offset=offset)


def provision_device(
    session: Session, *, device_id: str, cohort_id: str, labels: dict[str, str] | None = None
) -> tuple[Device, str]:
    """Register a device; return it and its one-time secret (only the secret's hash is stored)."""
    get_cohort(session, cohort_id)
    if session.get(Device, device_id) is not None:
        # A revoked id stays taken: its history (reports, telemetry) belongs to the old device.
        raise ConflictError(f"device {device_id} already exists")
    secret = new_secret()
    device = Device(
        id=device_id, cohort_id=cohort_id, credential_hash=hash_secret(secret), labels=labels or {}
    )
    session.add(device)
    session.flush()
    return device, secret


def get_device(session: Session, device_id: str) -> Device:
    """The device, or NotFoundError."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError("device", device_id)
    return device


def revoke_device(session: Session, device_id: str) -> Device:
    """Revoke a device: its credentials stop working here; the broker hook ends its live session."""
    device = get_device(session, device_id)
    if device.status is DeviceStatus.revoked:
        raise ConflictError(f"device {device_id} is already revoked")
    device.status = DeviceStatus.revoked
    device.revoked_at = utcnow()
    device.presence = Presence.offline
    return device


# What a device listing reads: these columns as plain rows (never the credential hash). Rows, not ORM
# objects: a page of 100 devices read into objects cost the API more than the query itself.
LISTED = (
    Device.id,
    Device.cohort_id,
    Device.status,
    Device.labels,
    Device.desired_model_id,
    Device.reported_model_id,
    Device.presence,
    Device.last_seen,
    Device.created_at,
    Device.revoked_at,
)


def list_devices(
    session: Session,
    *,
    limit: int,
    offset: int,
    cohort_id: str | None = None,
    status: DeviceStatus | None = None,
    presence: Presence | None = None,
    model_id: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """A page of devices by id (each a dict of the `LISTED` columns), filtered, with the total."""
    statement: Select[Any] = select(*LISTED).order_by(Device.id)
    if cohort_id is not None:
        statement = statement.where(Device.cohort_id == cohort_id)
    if status is not None:
        statement = statement.where(Device.status == status)
    if presence is not None:
        statement = statement.where(Device.presence == presence)
    if model_id is not None:
        statement = statement.where(Device.reported_model_id == model_id)
    return paginate_rows(session, statement, limit=limit, offset=offset)


def authenticate_device(session: Session, device_id: str, secret: str) -> Device | None:
    """The active device with these credentials, or None."""
    device = session.get(Device, device_id)
    if device is None or device.status is not DeviceStatus.active:
        return None
    return device if secret_matches(secret, device.credential_hash) else None


def offered_to(session: Session, device: Device, sha256: str) -> bool:
    """Whether the artifact `sha256` is offered to `device`: its desired or current model, or a rollout's."""
    # The reported model comes from the device itself, so it counts only within its own cohort.
    by_device = select(Model.id).where(
        Model.sha256 == sha256,
        or_(
            Model.id == device.desired_model_id,
            and_(
                Model.id == device.reported_model_id,
                Model.cohort_id == device.cohort_id,
                Model.kind == ModelKind.edge,
            ),
        ),
    )
    by_rollout = (
        select(RolloutTarget.device_id)
        .join(RolloutTarget.rollout)
        .join(Model, Model.id == Rollout.model_id)
        .where(
            RolloutTarget.device_id == device.id,
            RolloutTarget.state.in_([TargetState.pending, TargetState.offered, TargetState.installed]),
            Model.sha256 == sha256,
        )
    )
    return bool(session.scalar(select(or_(exists(by_device), exists(by_rollout)))))
