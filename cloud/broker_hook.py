"""The broker as the registry says it should be: the credential hook that registers and removes devices
in the running broker (mosquitto's dynamic security), and the reconciler that retries what the hook
could not do and repairs what drifted.

A certificate device has no client in the broker (one pattern rule over the certificate's name admits
every device): revoking it publishes the fleet CA's CRL, reloads the broker and then ends the device's
live session, which the reload does not (`cloud.crl`)."""

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from broker.acl import Command, device_acls, device_role, provision_commands, revoke_commands
from broker.client import BrokerTarget
from broker.dynsec import DynsecAdmin
from broker.exceptions import BrokerAdminError
from cloud.crl import CrlPublisher
from cloud.exceptions import HookError
from cloud.provisioning import CredentialHook
from cloud.registry.db import make_engine, session_factory
from cloud.registry.devices import broker_applied, broker_failed, broker_pending
from cloud.registry.tables import Device, DeviceStatus
from cloud.settings import Settings

log = logging.getLogger(__name__)

# What creating a device's role and client leaves behind, and the command that removes it.
_UNDO = {"createRole": ("deleteRole", "rolename"), "createClient": ("deleteClient", "username")}


class BrokerCredentialHook:
    """Creates a password device's client and role in the broker when it is provisioned, deletes them
    (which ends its live session) when it is revoked; a revoked certificate device is put on the CRL
    (`crl`) and its session ended."""

    def __init__(self, admin: DynsecAdmin, crl: CrlPublisher | None = None) -> None:
        self.admin = admin
        self.crl = crl

    def provisioned(self, device_id: str, secret: str) -> None:
        """Create the device's role and client; on failure, leave nothing of them behind."""
        commands = provision_commands(device_id, secret)
        try:
            self.admin.execute(commands)
        except BrokerAdminError as exc:
            # The registry rolls the device back: undo what the broker did create, so that a later
            # attempt is not refused as a duplicate. A role or client that existed is left alone.
            if exc.results:
                self._undo(
                    [c for c, r in zip(commands, exc.results, strict=True) if "error" not in r], device_id
                )
            elif exc.sent:  # sent, but no answer: whatever exists under this new id is this attempt's
                self._undo(commands, device_id)
            raise HookError(f"broker: {exc}") from None

    def revoked(self, device_id: str, *, certificate: bool = False) -> None:
        """Delete the device's client and role; already gone counts as done. For a certificate device:
        publish the CRL and reload the broker, then end its session."""
        if certificate:
            if self.crl is None:
                raise HookError("no fleet CA is configured to revoke a certificate device with")
            self.crl.publish()
            self.kick(device_id)
            return
        try:
            self.admin.execute(revoke_commands(device_id))
        except BrokerAdminError as exc:
            if _only_not_found(exc):
                return
            raise HookError(f"broker: {exc}") from None

    def kick(self, username: str) -> None:
        """End every session of `username` on every listener, certificate ones included: deleting a
        dynamic-security client disconnects its username, so one is made (with a password no one
        knows, and no role) and deleted at once."""
        password = secrets.token_urlsafe(32)
        self._execute(
            [
                {"command": "createClient", "username": username, "password": password},
                {"command": "deleteClient", "username": username},
            ]
        )

    def device_clients(self, page: int = 1000) -> set[str]:
        """The usernames of the broker's device clients (those in their own device role)."""
        found: set[str] = set()
        offset = 0
        while True:
            command = {"command": "listClients", "verbose": True, "count": page, "offset": offset}
            data = self._execute([command])[0].get("data", {})
            clients = data.get("clients", [])
            for client in clients:
                username = client.get("username")
                roles = [r.get("rolename") for r in client.get("roles", [])]
                if isinstance(username, str) and roles == [device_role(username)]:
                    found.add(username)
            offset += len(clients)
            if not clients or offset >= int(data.get("totalCount", 0)):
                return found

    def repair_roles(self, device_ids: list[str], batch: int = 100) -> list[str]:
        """Bring the roles of `device_ids` to the ACL a device has now (roles made by an older release
        lack newer grants); return the devices whose role changed."""
        repaired = []
        for start in range(0, len(device_ids), batch):
            chunk = device_ids[start : start + batch]
            roles = self._execute([{"command": "getRole", "rolename": device_role(d)} for d in chunk])
            fixes: list[Command] = []
            for device_id, answer in zip(chunk, roles, strict=True):
                have = {_acl_key(a) for a in answer.get("data", {}).get("role", {}).get("acls", [])}
                want = {_acl_key(a): a for a in device_acls(device_id)}
                role = device_role(device_id)
                # Removals first: a grant turned into a deny shares its (acltype, topic) with the grant.
                changes = [
                    {"command": "removeRoleACL", "rolename": role, "acltype": k[0], "topic": k[1]}
                    for k in have - want.keys()
                ]
                changes += [
                    {"command": "addRoleACL", "rolename": role, **a} for k, a in want.items() if k not in have
                ]
                if changes:
                    fixes += changes
                    repaired.append(device_id)
            if fixes:
                self._execute(fixes)
        return repaired

    def has_client(self, device_id: str) -> bool:
        """Whether the broker has a client for the device."""
        try:
            self.admin.execute([{"command": "getClient", "username": device_id}])
        except BrokerAdminError as exc:
            if _only_not_found(exc):
                return False
            raise HookError(f"broker: {exc}") from None
        return True

    def _execute(self, commands: list[Command]) -> list[dict[str, Any]]:
        try:
            return self.admin.execute(commands)
        except BrokerAdminError as exc:
            raise HookError(f"broker: {exc}") from None

    def _undo(self, created: list[dict[str, object]], device_id: str) -> None:
        undo = [
            {"command": _UNDO[str(c["command"])][0], key: c[key]}
            for c in reversed(created)
            for key in [_UNDO[str(c["command"])][1]]
        ]
        if not undo:
            return
        try:
            self.admin.execute(undo)
        except BrokerAdminError as exc:
            if not _only_not_found(exc):
                log.warning("could not undo the broker's half of provisioning %s: %s", device_id, exc)


MISSING = "the broker has no client for it: provision it again"


def _acl_key(acl: dict[str, Any]) -> tuple[str, str, bool]:
    return str(acl.get("acltype")), str(acl.get("topic")), bool(acl.get("allow"))


@dataclass
class Reconciliation:
    """What one pass of the reconciler did."""

    applied: list[str] = field(default_factory=list)  # pending changes the broker now reflects
    failed: dict[str, str] = field(default_factory=dict)  # device -> why it is still pending
    removed: list[str] = field(default_factory=list)  # device clients the registry holds no active device for
    repaired: list[str] = field(default_factory=list)  # device roles brought to the current ACL
    missing: list[str] = field(default_factory=list)  # active devices the broker has no client for


def reconcile(
    sessions: sessionmaker[Session], hook: BrokerCredentialHook, *, sweep: bool = False
) -> Reconciliation:
    """Make the broker reflect the registry. Every pass applies the pending changes (a revocation the
    broker was down for: its client is deleted, which also ends a session it opened since). A sweep
    also compares the whole broker with the registry: device clients without an active device are
    deleted, device roles are repaired, and an active device the broker lacks is flagged (its secret
    is not stored, so it must be provisioned again). Raises HookError when the broker is unreachable
    for the sweep; pending devices it could not apply are recorded with the reason."""
    done = Reconciliation()
    with sessions() as session:
        pending = broker_pending(session)
    for device_id, status, certificate in pending:
        try:
            if status is DeviceStatus.revoked:
                hook.revoked(device_id, certificate=certificate)
            elif not hook.has_client(device_id):
                raise HookError(MISSING)
            else:
                hook.repair_roles([device_id])
        except HookError as exc:
            done.failed[device_id] = str(exc)
            with sessions() as session, session.begin():
                broker_failed(session, device_id, str(exc))
            continue
        with sessions() as session, session.begin():
            broker_applied(session, device_id)
        done.applied.append(device_id)
    if pending and len(done.failed) == len(pending):
        return done  # the broker is down: nothing more can be done now
    if sweep:
        _sweep(sessions, hook, done)
    for device_id in done.applied + done.removed:
        log.info("broker reconciled %s", device_id)
    return done


def _sweep(sessions: sessionmaker[Session], hook: BrokerCredentialHook, done: Reconciliation) -> None:
    clients = hook.device_clients()
    with sessions() as session:
        active = set(session.scalars(select(Device.id).where(Device.status == DeviceStatus.active)))
        managed = set(session.scalars(select(Device.id).where(Device.broker_sync.is_not(None))))
    for username in sorted(clients - active):
        hook.revoked(username)
        done.removed.append(username)
    done.repaired = hook.repair_roles(sorted(clients & active))
    done.missing = sorted((active & managed) - clients)
    if done.missing:
        with sessions() as session, session.begin():
            for device_id in done.missing:
                broker_failed(session, device_id, MISSING)
    log.info(
        "broker sweep: %d device clients, %d removed, %d roles repaired, %d missing",
        len(clients),
        len(done.removed),
        len(done.repaired),
        len(done.missing),
    )


def _only_not_found(exc: BrokerAdminError) -> bool:
    """Whether the broker refused only because what the commands name does not exist."""
    return bool(exc.failures) and all(f.error.endswith("not found") for f in exc.failures)


def hook_from_settings(
    settings: Settings, sessions: sessionmaker[Session] | None = None
) -> BrokerCredentialHook | None:
    """The broker hook when the admin URL is set (it connects on first use), else None. Its CRL lists
    the revoked certificate devices of the registry that `sessions` (default: the settings') open."""
    if settings.mqtt_admin_url is None:
        return None
    target = BrokerTarget.parse(settings.mqtt_admin_url.get_secret_value(), ca_file=settings.mqtt_ca_file)
    sessions = sessions or session_factory(make_engine(settings.resolved_database_url))
    return BrokerCredentialHook(DynsecAdmin(target), crl_from_settings(settings, sessions))


def crl_from_settings(settings: Settings, sessions: sessionmaker[Session]) -> CrlPublisher:
    """The fleet CA's CRL of the registry `sessions` open, and how the broker reloads it."""
    return CrlPublisher(settings.resolved_fleet_ca_dir, sessions, settings.broker_pid_file)


def hooks_from_settings(
    settings: Settings, sessions: sessionmaker[Session] | None = None
) -> list[CredentialHook]:
    """The hooks the API tells of device credentials: the broker's, when it is managed."""
    hook = hook_from_settings(settings, sessions)
    return [] if hook is None else [hook]
