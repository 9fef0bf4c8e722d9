"""Operators' commands to devices: stored pending, sent while the device is online, finished by the
device's result (stored once) or by expiry."""

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import Select, or_, select, update
from sqlalchemy.orm import Session

from cloud.exceptions import ConflictError, NotFoundError
from cloud.registry.common import paginate
from cloud.registry.devices import get_device
from cloud.registry.tables import (
    CommandState,
    Device,
    DeviceCommand,
    DeviceStatus,
    Presence,
    utcnow,
)
from wire.messages import CommandName, CommandResult

OPEN_STATES = (CommandState.pending, CommandState.sent)
# What a device's result may still finish: an open command, or one the cloud expired while the device's
# (late) answer was on its way; once a result is stored, no other result changes it.
ANSWERABLE_STATES = (*OPEN_STATES, CommandState.expired)
EXPIRED_DETAIL = "not answered before it expired"


class Recorded(StrEnum):
    """What `record_result` did with a result."""

    stored = "stored"
    duplicate = "duplicate"  # this result, or another one, was stored for the command before


def create(
    session: Session,
    *,
    device_id: str,
    command: CommandName,
    ttl: timedelta,
    requested_by: str = "",
    now: datetime | None = None,
) -> DeviceCommand:
    """Store a pending command for an active device. NotFoundError for an unknown device, ConflictError
    for a revoked one."""
    device = get_device(session, device_id)
    if device.status is not DeviceStatus.active:
        raise ConflictError(f"device {device_id} is {device.status.value}: it takes no commands")
    now = now or utcnow()
    row = DeviceCommand(
        id=uuid.uuid4(),
        device_id=device_id,
        command=command,
        state=CommandState.pending,
        requested_by=requested_by,
        created_at=now,
        expires_at=now + ttl,
        send_count=0,
        detail="",
        values={},
    )
    session.add(row)
    session.flush()
    return row


def list_for_device(
    session: Session, *, device_id: str, limit: int, offset: int, state: CommandState | None = None
) -> tuple[Sequence[DeviceCommand], int]:
    """A page of one device's commands, newest first, with the total. NotFoundError for an unknown device."""
    get_device(session, device_id)
    statement: Select[DeviceCommand] = (
        select(DeviceCommand)
        .where(DeviceCommand.device_id == device_id)
        .order_by(DeviceCommand.created_at.desc(), DeviceCommand.id)
    )
    if state is not None:
        statement = statement.where(DeviceCommand.state == state)
    return paginate(session, statement, limit=limit, offset=offset)


def get(session: Session, *, device_id: str, command_id: uuid.UUID) -> DeviceCommand:
    """One command of a device; NotFoundError if the device has no command of that id."""
    row = session.get(DeviceCommand, command_id)
    if row is None or row.device_id != device_id:
        raise NotFoundError("command", command_id)
    return row


def mark_sent(session: Session, *, command_ids: Sequence[uuid.UUID], now: datetime | None = None) -> int:
    """Record that the commands were published (again) now; a finished one stays finished. Returns how
    many were open."""
    if not command_ids:
        return 0
    result = session.execute(
        update(DeviceCommand)
        .where(DeviceCommand.id.in_(command_ids), DeviceCommand.state.in_(OPEN_STATES))
        .values(
            state=CommandState.sent,
            sent_at=now or utcnow(),
            send_count=DeviceCommand.send_count + 1,
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def expire_due(session: Session, *, now: datetime | None = None) -> int:
    """Finish as expired every open command whose `expires_at` has passed; returns how many."""
    now = now or utcnow()
    result = session.execute(
        update(DeviceCommand)
        .where(DeviceCommand.state.in_(OPEN_STATES), DeviceCommand.expires_at <= now)
        .values(state=CommandState.expired, finished_at=now, detail=EXPIRED_DETAIL)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def pending_for(
    session: Session,
    *,
    now: datetime | None = None,
    resend_after: timedelta = timedelta(minutes=1),
    device_id: str | None = None,
    limit: int = 500,
) -> list[DeviceCommand]:
    """The unexpired commands to publish now, oldest first: those of active devices that are online
    which were never sent, or were sent `resend_after` ago and not answered (a device that dropped
    as it was sent never got it; one that did answers the same msg_id with the same result)."""
    now = now or utcnow()
    statement = (
        select(DeviceCommand)
        .join(Device, Device.id == DeviceCommand.device_id)
        .where(
            Device.status == DeviceStatus.active,
            Device.presence == Presence.online,
            DeviceCommand.expires_at > now,
            or_(
                DeviceCommand.state == CommandState.pending,
                (DeviceCommand.state == CommandState.sent) & (DeviceCommand.sent_at <= now - resend_after),
            ),
        )
        .order_by(DeviceCommand.created_at, DeviceCommand.id)
        .limit(limit)
    )
    if device_id is not None:
        statement = statement.where(DeviceCommand.device_id == device_id)
    return list(session.scalars(statement))


def record_result(
    session: Session, result: CommandResult, *, received_at: datetime | None = None
) -> Recorded:
    """Finish the command `result.ack_of` with the device's outcome, once.

    A second result for the command (the same message again, or another answer) is a duplicate and
    changes nothing. NotFoundError when the command is unknown or another device's, ConflictError
    when the result names another command than the one sent. One conditional UPDATE: two ingests
    storing results for one command store one."""
    received_at = received_at or utcnow()
    state = CommandState(result.outcome.value)
    changed = session.execute(
        update(DeviceCommand)
        .where(
            DeviceCommand.id == result.ack_of,
            DeviceCommand.device_id == result.device_id,
            DeviceCommand.command == result.command,
            DeviceCommand.result_msg_id.is_(None),
            DeviceCommand.state.in_(ANSWERABLE_STATES),
        )
        .values(
            state=state,
            finished_at=received_at,
            detail=result.detail,
            values=dict(result.values),
            result_msg_id=result.msg_id,
        )
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount == 1:  # type: ignore[attr-defined]
        return Recorded.stored
    row = session.execute(
        select(DeviceCommand.device_id, DeviceCommand.command, DeviceCommand.result_msg_id).where(
            DeviceCommand.id == result.ack_of
        )
    ).one_or_none()
    if row is None or row.device_id != result.device_id:
        raise NotFoundError(f"command of device {result.device_id}", result.ack_of)
    if row.command != result.command:
        raise ConflictError(f"command {result.ack_of} is {row.command.value}, not {result.command.value}")
    return Recorded.duplicate
