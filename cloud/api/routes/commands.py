"""Device commands: an operator asks a device to report now or run RD, and reads what it answered."""

import logging
import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from broker.client import BrokerTarget
from broker.exceptions import BrokerError
from cloud.api.deps import Operator, PageQuery, ReaderDep, Services, ServicesDep, SessionDep, Viewer
from cloud.api.schemas import CommandCreate, CommandPublic, Page, errors
from cloud.exceptions import PublishError
from cloud.publisher import CloudPublisher
from cloud.registry import audit, commands
from cloud.registry.devices import get_device
from cloud.registry.tables import CommandState, DeviceCommand, Presence

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/devices", tags=["commands"])
PUBLISH_TIMEOUT_S = 5.0  # a broker slower than this leaves the command to the worker's next pass


class CommandFilter(PageQuery):
    state: CommandState | None = None


def _publish(services: Services, command: DeviceCommand) -> bool:
    """Publish `command` to its device now; False (logged) when the broker cannot take it: the command
    stays pending and the worker's beat sends it."""
    settings = services.settings
    try:
        target = BrokerTarget.parse(settings.mqtt_url.get_secret_value(), ca_file=settings.mqtt_ca_file)
        with CloudPublisher(
            target, services.keyring, timeout=PUBLISH_TIMEOUT_S, client_id=settings.mqtt_client_id
        ) as publisher:
            publisher.send_command(
                command.device_id, command.command, msg_id=command.id, expires_at=command.expires_at
            )
    except (PublishError, BrokerError) as exc:  # BrokerError: a broker URL or CA file that cannot be used
        log.warning("command %s to %s left for the worker: %s", command.id, command.device_id, exc)
        return False
    return True


@router.post(
    "/{device_id}/commands",
    status_code=201,
    responses=errors({404: "no such device", 409: "the device is revoked"}),
)
def create(
    device_id: str, body: CommandCreate, session: SessionDep, services: ServicesDep, caller: Operator
) -> CommandPublic:
    """Send a command to a device. It is stored first; a device that is online gets it at once, one
    that is not when it comes back (the worker looks every few seconds), unless `ttl_s` runs out
    first (state `expired`). The device answers with `done`, `failed` or `refused` and a detail; read
    it at GET .../commands/{command_id}."""
    command = commands.create(
        session,
        device_id=device_id,
        command=body.command,
        ttl=timedelta(seconds=body.ttl_s),
        requested_by=caller.actor,
    )
    audit.record(
        session,
        actor=caller.actor,
        action="device.command",
        target=device_id,
        command=body.command.value,
        command_id=str(command.id),
    )
    session.commit()
    # Published after the commit, so a device's fast answer always finds its command stored.
    if get_device(session, device_id).presence is Presence.online and _publish(services, command):
        commands.mark_sent(session, command_ids=[command.id])
        session.commit()
        session.refresh(command)
    return CommandPublic.model_validate(command)


@router.get("/{device_id}/commands", responses=errors({404: "no such device"}))
async def list_(
    device_id: str, reader: ReaderDep, _: Viewer, query: Annotated[CommandFilter, Query()]
) -> Page[CommandPublic]:
    """A device's commands, newest first, optionally in one state."""
    rows, total = await reader.run_sync(
        lambda s: commands.list_for_device(
            s, device_id=device_id, limit=query.limit, offset=query.offset, state=query.state
        )
    )
    return Page.of(CommandPublic, rows, total, limit=query.limit, offset=query.offset)


@router.get("/{device_id}/commands/{command_id}", responses=errors({404: "no such device or command"}))
async def get(device_id: str, command_id: uuid.UUID, reader: ReaderDep, _: Viewer) -> CommandPublic:
    """One command of a device, with its result once the device answered."""
    row = await reader.run_sync(lambda s: commands.get(s, device_id=device_id, command_id=command_id))
    return CommandPublic.model_validate(row)
