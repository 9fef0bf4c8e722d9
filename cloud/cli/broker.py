"""`diredi broker`: the production broker's service accounts, and making it reflect the registry."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from cloud.cli.ops import _fail, _migrated_engine, _settings
from cloud.exceptions import CloudError

if TYPE_CHECKING:
    from broker.client import BrokerTarget

broker_app = typer.Typer(help="The broker: service accounts, and reconciling it with the registry.")
console = Console()
err = Console(stderr=True)


def _admin_target() -> BrokerTarget:
    from broker.client import BrokerTarget
    from broker.exceptions import BrokerURLError

    settings = _settings()
    if settings.mqtt_admin_url is None:
        raise _fail(CloudError("DIREDI_MQTT_ADMIN_URL is not set: the broker's admin account is needed"))
    try:
        return BrokerTarget.parse(settings.mqtt_admin_url.get_secret_value(), ca_file=settings.mqtt_ca_file)
    except BrokerURLError as exc:
        raise _fail(CloudError(f"DIREDI_MQTT_ADMIN_URL: {exc}")) from None


@broker_app.command("account")
def account(
    name: Annotated[str, typer.Argument(help="diredi-<service>-<instance>, e.g. diredi-ingest-a.")],
) -> None:
    """Create (or give a new password to) one service process's own account, bound to the client id
    NAME; print its password once. Run each ingest and worker with it: DIREDI_MQTT_URL as NAME and
    DIREDI_MQTT_CLIENT_ID=NAME."""
    from broker.exceptions import BrokerAdminError
    from broker.mosquitto import ensure_service_account

    target = _admin_target()
    password = secrets.token_hex(32)  # hex: safe in a URL
    try:
        ensure_service_account(target, name, password)
    except (ValueError, BrokerAdminError) as exc:
        raise _fail(exc) from None
    err.print(f"account {name}, bound to client id {name}; its password is shown once, store it now:")
    console.print(password, soft_wrap=True, highlight=False)


@broker_app.command("reconcile")
def reconcile(
    sweep: Annotated[
        bool, typer.Option("--sweep", help="Compare the whole broker with the registry.")
    ] = False,
) -> None:
    """Apply to the broker what the registry holds and it does not (revocations made while it was
    down); with --sweep also delete device clients without an active device and repair device roles.
    The worker's beat does this every 15 s (sweeping every 10 minutes)."""
    from broker.dynsec import DynsecAdmin
    from cloud.broker_hook import BrokerCredentialHook
    from cloud.broker_hook import reconcile as run
    from cloud.registry.db import session_factory

    target = _admin_target()
    sessions = session_factory(_migrated_engine(_settings()))
    with DynsecAdmin(target) as admin:
        try:
            done = run(sessions, BrokerCredentialHook(admin), sweep=sweep)
        except CloudError as exc:
            raise _fail(exc) from None
    console.print(
        f"applied {len(done.applied)}, still pending {len(done.failed)}, removed {len(done.removed)}, "
        f"roles repaired {len(done.repaired)}, missing from the broker {len(done.missing)}"
    )
    for device_id, why in sorted(done.failed.items()):
        err.print(f"  {device_id}: {why}", soft_wrap=True)
    if done.failed:
        raise typer.Exit(1)
