"""The credential hook that registers devices with the running broker (mosquitto's dynamic security)."""

import logging

from broker.acl import provision_commands, revoke_commands
from broker.client import BrokerTarget
from broker.dynsec import BrokerAdminError, DynsecAdmin
from cloud.exceptions import HookError
from cloud.provisioning import CredentialHook
from cloud.settings import Settings

log = logging.getLogger(__name__)

# What creating a device's role and client leaves behind, and the command that removes it.
_UNDO = {"createRole": ("deleteRole", "rolename"), "createClient": ("deleteClient", "username")}


class BrokerCredentialHook:
    """Creates a device's client and role in the broker when it is provisioned, deletes them (which
    ends its live session) when it is revoked."""

    def __init__(self, admin: DynsecAdmin) -> None:
        self.admin = admin

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

    def revoked(self, device_id: str) -> None:
        """Delete the device's client and role; already gone counts as done."""
        try:
            self.admin.execute(revoke_commands(device_id))
        except BrokerAdminError as exc:
            if exc.failures and all(f.error.endswith("not found") for f in exc.failures):
                return
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
            if not (exc.failures and all(f.error.endswith("not found") for f in exc.failures)):
                log.warning("could not undo the broker's half of provisioning %s: %s", device_id, exc)


def hooks_from_settings(settings: Settings) -> list[CredentialHook]:
    """The broker hook when the admin URL is set (it connects on first use), else none."""
    if settings.mqtt_admin_url is None:
        return []
    target = BrokerTarget.parse(settings.mqtt_admin_url.get_secret_value(), ca_file=settings.mqtt_ca_file)
    return [BrokerCredentialHook(DynsecAdmin(target))]
