"""The provisioning hook: what else must learn of a device's credentials (the MQTT broker, issue 4)."""

from typing import Protocol


class CredentialHook(Protocol):
    """Told of every provisioned and revoked device, so the broker admits or drops it without a restart.

    `provisioned` runs inside the registry transaction: if it raises, the device is not created.
    `revoked` runs after the revocation is committed and must also end the device's live session;
    it is idempotent (revoking again re-runs it).
    """

    def provisioned(self, device_id: str, secret: str) -> None: ...

    def revoked(self, device_id: str) -> None: ...
