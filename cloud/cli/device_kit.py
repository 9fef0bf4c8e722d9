"""A provisioned device's kit: the daemon's configuration and its secret, written where the operator
says, ready for `diredi-device run --config DIR/device.toml` (or to copy to the device's
/etc/diredi-device, where the paths are edited to its own).

The configuration is the daemon's own model (`device_firmware_py.config`), checked before the device is
provisioned, so a bad broker URL costs nothing."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from cloud.exceptions import CloudError
from device_firmware_py.config import DeviceConfig, write_config
from wire.errors import describe

if TYPE_CHECKING:  # the API's schemas (FastAPI) are not worth importing at every CLI start
    from cloud.api.schemas import DeviceProvisioned

CONFIG = "device.toml"
CREDENTIALS = "secret"  # the file the device reads its secret from
INBOX = "inbox"  # the `directory` input source: where a camera (or app) drops the inputs
_PLACEHOLDER_KEYS = {"0" * 16: base64.b64encode(bytes(32)).decode()}  # the real ones come with provisioning


class SecretFile:
    """A new owner-only file for a device's one-time secret, made before the device is provisioned (the
    secret the API shows once must have somewhere to go), written or removed after."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise CloudError(f"cannot create the secret file {path}: {exc.strerror}") from None

    def write(self, secret: str) -> None:
        with os.fdopen(self._fd, "w", encoding="utf-8") as out:
            out.write(secret + "\n")

    def abandon(self) -> None:
        """Provisioning failed: remove the empty file."""
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


class Kit:
    """The kit's directory, made and checked before provisioning, filled after it."""

    def __init__(self, directory: Path, *, device_id: str, broker_url: str, api_url: str) -> None:
        self.directory = directory.absolute()
        self.device_id = device_id
        self.broker_url = broker_url
        self.api_url = api_url
        self._config(_PLACEHOLDER_KEYS, trust_version=0, trust_threshold=1)  # the URLs and the id
        for name in (CONFIG, CREDENTIALS):
            if (self.directory / name).exists():
                raise CloudError(f"{self.directory / name} exists; a kit never overwrites one")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CloudError(f"cannot write the device kit to {self.directory}: {exc.strerror}") from None
        self.secret = SecretFile(self.directory / CREDENTIALS)

    def fill(self, made: DeviceProvisioned) -> Path:
        """Write the secret and the configuration (with the trusted keys provisioning returned); return
        the configuration's path."""
        if made.secret is None:
            raise CloudError("the API answered without the device's secret")
        self.secret.write(made.secret)
        config = self._config(
            {k.key_id: k.public_key for k in made.trusted_keys},
            trust_version=made.trust_version,
            trust_threshold=made.trust_threshold,
        )
        (self.directory / INBOX).mkdir(mode=0o700, exist_ok=True)
        path = write_config(self.directory / CONFIG, config)
        path.chmod(0o600)
        return path

    def _config(self, keys: dict[str, str], *, trust_version: int, trust_threshold: int) -> DeviceConfig:
        try:
            return DeviceConfig.model_validate(
                {
                    "device_id": self.device_id,
                    "state_dir": self.directory / "state",
                    "trust_version": trust_version,
                    "trust_threshold": trust_threshold,
                    "broker": {"url": self.broker_url},
                    "credentials": {"file": self.directory / CREDENTIALS},
                    "api": {"url": self.api_url},
                    "trust": keys,
                    "input": {"source": "directory", "path": self.directory / INBOX},
                }
            )
        except ValidationError as exc:
            raise CloudError(f"the device kit's configuration: {describe(exc)}") from None
