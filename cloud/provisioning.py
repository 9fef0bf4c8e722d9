"""The provisioning hook: what else must learn of a device's credentials (the MQTT broker, issue 4)."""

from typing import Protocol

from cloud.exceptions import HookError


def describe_failure(exc: Exception) -> str:
    """What may be logged and shown of a hook's failure."""
    return str(exc) if isinstance(exc, HookError) else f"{type(exc).__name__} (details withheld)"


class CredentialHook(Protocol):
    """Told of every provisioned and revoked device, so the broker admits or drops it without a restart.

    `provisioned` runs inside the registry transaction: if it raises, the device is not created.
    `revoked` runs after the revocation is committed and must also end the device's live session;
    it is idempotent (revoking again re-runs it). A certificate device (`certificate`) was never
    `provisioned` here: its certificate names it, and revoking it means refusing that certificate.

    A hook raises HookError with a message safe to log and to show; the message of any other error
    is never shown or logged (it could hold the secret, say a failed command line), only its type.
    """

    def provisioned(self, device_id: str, secret: str) -> None: ...

    def revoked(self, device_id: str, *, certificate: bool = False) -> None: ...
