"""Cohorts and devices: provisioning (a one-time password, or a certificate for the device's own key),
revocation, lookup, artifact offers."""

import functools
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Integer,
    Select,
    String,
    Table,
    Update,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from cloud.exceptions import ConflictError, InvalidValueError, NotFoundError, RegistryError
from cloud.registry import labels
from cloud.registry.common import RowPages, hash_secret, new_secret, paginate, secret_matches
from cloud.registry.tables import (
    BrokerSync,
    Cohort,
    Device,
    DeviceStatus,
    Model,
    ModelKind,
    Presence,
    Rollout,
    RolloutState,
    RolloutTarget,
    TargetState,
    utcnow,
)
from wire.topics import DEVICE_ID_PATTERN, reserved_device_id


def check_cohort_id(cohort_id: str) -> str:
    """`cohort_id` if the API would take it (a device id's pattern: it names topics and files too),
    else InvalidValueError."""
    if not re.fullmatch(DEVICE_ID_PATTERN, cohort_id):
        raise InvalidValueError(f"cohort id {cohort_id!r} must match {DEVICE_ID_PATTERN}")
    return cohort_id


def create_cohort(session: Session, *, cohort_id: str, description: str = "") -> Cohort:
    """A new cohort (model line); its id must be new, and one `check_cohort_id` takes."""
    check_cohort_id(cohort_id)
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


class Certificate(NamedTuple):
    """What the registry keeps of a device's certificate (the fleet CA issues it)."""

    serial: int
    sha256: str
    not_after: datetime


def check_new_device(session: Session, *, device_id: str, cohort_id: str) -> None:
    """RegistryError, NotFoundError or ConflictError unless `device_id` may be provisioned in the cohort
    (checked before a certificate is issued for it)."""
    if (reason := reserved_device_id(device_id)) is not None:
        raise RegistryError(reason)
    get_cohort(session, cohort_id)
    if session.get(Device, device_id) is not None:
        # A revoked id stays taken: its history (reports, telemetry) belongs to the old device.
        raise ConflictError(f"device {device_id} already exists")


def provision_device(
    session: Session, *, device_id: str, cohort_id: str, labels: dict[str, str] | None = None
) -> tuple[Device, str]:
    """Register a password device; return it and its one-time secret (only the secret's hash is stored)."""
    check_new_device(session, device_id=device_id, cohort_id=cohort_id)
    secret = new_secret()
    device = Device(
        id=device_id, cohort_id=cohort_id, credential_hash=hash_secret(secret), labels=labels or {}
    )
    session.add(device)
    session.flush()
    return device, secret


def provision_certificate_device(
    session: Session,
    *,
    device_id: str,
    cohort_id: str,
    certificate: Certificate,
    labels: dict[str, str] | None = None,
) -> Device:
    """Register a device that authenticates by `certificate` (no password: it has no secret here)."""
    check_new_device(session, device_id=device_id, cohort_id=cohort_id)
    device = Device(
        id=device_id,
        cohort_id=cohort_id,
        labels=labels or {},
        cert_serial=f"{certificate.serial:x}",
        cert_sha256=certificate.sha256,
        cert_not_after=certificate.not_after,
    )
    session.add(device)
    session.flush()
    return device


def revoked_certificates(session: Session) -> list[tuple[int, datetime]]:
    """(serial, revoked at) of every revoked certificate device: what the fleet CA's CRL lists."""
    rows = session.execute(
        select(Device.cert_serial, Device.revoked_at).where(
            Device.status == DeviceStatus.revoked, Device.cert_serial.is_not(None)
        )
    )
    return [(int(serial or "0", 16), at or utcnow()) for serial, at in rows]


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


def broker_applied(session: Session, device_id: str) -> None:
    """The broker now reflects the device's registry state."""
    session.execute(
        update(Device).where(Device.id == device_id).values(broker_sync=BrokerSync.synced, broker_error=None)
    )


def broker_failed(session: Session, device_id: str, error: str) -> None:
    """The broker could not be told of the device's state; the reconciler tries again."""
    session.execute(
        update(Device)
        .where(Device.id == device_id)
        .values(broker_sync=BrokerSync.pending, broker_error=error[:1000])
    )


class PendingDevice(NamedTuple):
    id: str
    status: DeviceStatus
    certificate: bool  # a certificate device: the broker learns of it by the CRL, not by a client


def broker_pending(session: Session, *, limit: int = 500) -> list[PendingDevice]:
    """Devices whose state the broker does not reflect yet, oldest change first."""
    rows = session.execute(
        select(Device.id, Device.status, Device.cert_serial.is_not(None))
        .where(Device.broker_sync == BrokerSync.pending)
        .order_by(Device.revoked_at, Device.id)
        .limit(limit)
    )
    return [PendingDevice(*row) for row in rows]


# What a device listing reads: these columns as plain rows (never the credential hash). Rows, not ORM
# objects: a page of 100 devices read into objects cost the API more than the query itself. Enums are
# read as their text on every backend alike: what the driver gives, with no conversion per value (the
# SQL is unchanged: no CAST, which the database would compute for every row the OFFSET skips too).
def _text(column: Any) -> Any:
    return type_coerce(column, String()).label(column.key)


LISTED = (
    Device.id,
    Device.cohort_id,
    _text(Device.status),
    Device.labels,
    Device.desired_model_id,
    Device.reported_model_id,
    _text(Device.presence),
    Device.last_seen,
    Device.created_at,
    Device.revoked_at,
    Device.trust_version,
    _text(Device.broker_sync),
    Device.broker_error,
    Device.cert_sha256,
    Device.cert_not_after,
)


# The filters a listing takes, by name, and the column each compares for equality.
LISTING_FILTERS = {
    "cohort_id": Device.cohort_id,
    "status": Device.status,
    "presence": Device.presence,
    "model_id": Device.reported_model_id,
}


@functools.lru_cache(maxsize=256)
def _listing(filters: tuple[str, ...], selector: tuple[labels.Op, ...], dialect: str) -> RowPages:
    """The listing's pages for this combination of filters and shape of label selector (each value a
    bound parameter), built once."""
    statement: Select[Any] = select(*LISTED).order_by(Device.id)
    for name in filters:
        statement = statement.where(LISTING_FILTERS[name] == bindparam(f"filter_{name}"))
    for condition in labels.where(selector, dialect):
        statement = statement.where(condition)
    return RowPages(statement)


def _listing_for(dialect: str, selector: str | None, **given: Any) -> tuple[RowPages, dict[str, Any]]:
    # The listing's pages for the filters given (None: not filtered), and the values to bind.
    filters = {name: value for name, value in given.items() if value is not None}
    terms = labels.parse_selector(selector) if selector is not None else ()
    params = {f"filter_{name}": value for name, value in filters.items()} | labels.bound(terms, dialect)
    return _listing(tuple(filters), labels.shape(terms), dialect), params


def list_devices(
    session: Session,
    *,
    limit: int,
    offset: int,
    cohort_id: str | None = None,
    status: DeviceStatus | None = None,
    presence: Presence | None = None,
    model_id: str | None = None,
    selector: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """A page of devices by id (each a dict of the `LISTED` columns, enums as text), filtered (by
    equality, and `selector` over labels: `labels.parse_selector`), with the total."""
    dialect = session.get_bind().dialect.name
    pages, params = _listing_for(
        dialect, selector, cohort_id=cohort_id, status=status, presence=presence, model_id=model_id
    )
    return pages.read(session, limit=limit, offset=offset, params=params)


async def list_devices_async(
    engine: AsyncEngine,
    *,
    limit: int,
    offset: int,
    cohort_id: str | None = None,
    status: DeviceStatus | None = None,
    presence: Presence | None = None,
    model_id: str | None = None,
    selector: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """`list_devices` on an asynchronous engine, for the API's event loop: the fleet's busiest read, run
    on the driver's own cursor where it can be (`RowPages.read_async`)."""
    pages, params = _listing_for(
        engine.dialect.name,
        selector,
        cohort_id=cohort_id,
        status=status,
        presence=presence,
        model_id=model_id,
    )
    return await pages.read_async(engine, limit=limit, offset=offset, params=params)


def set_labels(session: Session, device_id: str, changes: Mapping[str, str | None]) -> Device:
    """Set (a value) or remove (None) labels of a device; the others stay. NotFoundError, or
    InvalidValueError past `labels.MAX_LABELS`."""
    device = get_device(session, device_id)
    device.labels = labels.merged(device.labels, changes)  # a new dict: the JSON column sees the change
    return device


def device_by_certificate(session: Session, sha256: str) -> Device | None:
    """The active device whose certificate has this fingerprint, or None."""
    device = session.scalar(select(Device).where(Device.cert_sha256 == sha256))
    return device if device is not None and device.status is DeviceStatus.active else None


def authenticate_device(session: Session, device_id: str, secret: str) -> Device | None:
    """The active device with these credentials, or None."""
    device = session.get(Device, device_id)
    if device is None or device.status is not DeviceStatus.active:
        return None
    if device.credential_hash is None:
        return None  # a certificate device has no password
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
            # A halted or rolled-back rollout withdrew its model, also from targets not yet told so.
            Rollout.state.notin_([RolloutState.halted, RolloutState.rolled_back]),
            Model.sha256 == sha256,
        )
    )
    return bool(session.scalar(select(or_(exists(by_device), exists(by_rollout)))))


class KnownDevice(NamedTuple):
    """What the ingest needs to know of a device a message came from."""

    status: DeviceStatus
    reported_model_id: str | None
    trust_version: int | None = None


def known_devices(session: Session, device_ids: Collection[str]) -> dict[str, KnownDevice]:
    """Those of `device_ids` the registry knows, in one query."""
    if not device_ids:
        return {}
    rows = session.execute(
        select(Device.id, Device.status, Device.reported_model_id, Device.trust_version).where(
            Device.id.in_(device_ids)
        )
    )
    return {row.id: KnownDevice(row.status, row.reported_model_id, row.trust_version) for row in rows}


def behind_on_trust(session: Session, version: int) -> int:
    """How many active devices have not reported trust version `version` (or a later one) yet."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Device)
            .where(Device.status == DeviceStatus.active)
            .where(or_(Device.trust_version.is_(None), Device.trust_version < version))
        )
        or 0
    )


def report_trust(session: Session, versions: dict[str, int]) -> None:
    """Record the trust version each device reports (one statement for a batch). Versions only grow:
    a status that arrives late does not take a device back."""
    if versions:
        table = cast(Table, Device.__table__)
        version = bindparam("t_version", type_=Integer())
        statement = (
            update(table)
            .where(table.c.id == bindparam("t_id", type_=Device.id.type))
            .where(or_(table.c.trust_version.is_(None), table.c.trust_version < version))
            .values(trust_version=version)
        )
        session.connection().execute(
            statement, [{"t_id": device_id, "t_version": version} for device_id, version in versions.items()]
        )


def mark_seen(session: Session, device_ids: Collection[str], at: datetime) -> None:
    """Record that the devices were heard from at `at` (one statement for a whole ingest batch)."""
    if device_ids:
        session.execute(
            update(Device)
            .where(Device.id.in_(device_ids))
            .where(or_(Device.last_seen.is_(None), Device.last_seen < at))
            .values(last_seen=at)
        )


def apply_presence(session: Session, device_id: str, *, online: bool, conn: str, sent_at: datetime) -> bool:
    """Apply a presence message by DESIGN §2's `conn` rule; return whether it changed the device.

    The newest presence wins. A will is stamped when its connection is made, like the `online` that
    follows it, so at one instant the `offline` of that same connection wins over its `online`, and a
    stale will (an old `conn`) is older than the `online` of the connection that replaced it. An
    `offline` newer than the stored presence applies whatever its `conn`: it is the will of a later
    connection whose `online` is not applied yet (another ingest has it), and must not be lost. One
    conditional UPDATE each, so several ingests applying the same messages in any order end in the
    same state.
    """
    params = {"p_id": device_id, "p_conn": conn, "p_at": sent_at}
    return bool(session.connection().execute(_presence_statement(online), params).rowcount)


@dataclass(frozen=True)
class PresenceUpdate:
    """One presence message, as `apply_presences` takes it."""

    device_id: str
    online: bool
    conn: str
    sent_at: datetime


def apply_presences(session: Session, updates: Sequence[PresenceUpdate]) -> None:
    """`apply_presence` for a batch: one statement run for all the batch's `online`s, one for its
    `offline`s (the rule gives the same result in any order, so grouping them changes nothing; one
    UPDATE round trip per message was the cost of a fleet reconnecting at once)."""
    for online in (True, False):
        params = [
            {"p_id": u.device_id, "p_conn": u.conn, "p_at": u.sent_at} for u in updates if u.online is online
        ]
        if params:
            session.connection().execute(_presence_statement(online), params)


def _presence_statement(online: bool) -> Update:
    table = cast(Table, Device.__table__)
    at = bindparam("p_at", type_=Device.presence_at.type)
    conn = bindparam("p_conn", type_=Device.presence_conn.type)
    newer = or_(table.c.presence_at.is_(None), table.c.presence_at < at)
    same_instant = table.c.presence_at == at
    statement = update(table).where(
        table.c.id == bindparam("p_id", type_=Device.id.type), table.c.status == DeviceStatus.active
    )
    if online:
        statement = statement.where(or_(newer, and_(same_instant, table.c.presence == Presence.online)))
    else:
        statement = statement.where(or_(newer, and_(same_instant, table.c.presence_conn == conn)))
    state = Presence.online if online else Presence.offline
    return statement.values(presence=state, presence_conn=conn, presence_at=at)


def existing_models(session: Session, model_ids: Collection[str]) -> set[str]:
    """Those of `model_ids` the registry knows."""
    if not model_ids:
        return set()
    return set(session.scalars(select(Model.id).where(Model.id.in_(model_ids))))


def report_model(session: Session, device_id: str, model_id: str) -> bool:
    """Record the model a device says it runs, when the registry knows that model; return whether it did."""
    known = select(Model.id).where(Model.id == model_id).scalar_subquery()
    result = session.execute(
        update(Device)
        .where(Device.id == device_id, known.is_not(None))
        .where(or_(Device.reported_model_id.is_(None), Device.reported_model_id != model_id))
        .values(reported_model_id=model_id)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
