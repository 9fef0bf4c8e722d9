"""The daemon's configuration: one TOML file, validated whole at start, every error naming its key.

```toml
device_id = "cam-kitchen-1"
state_dir = "/var/lib/diredi-device"         # spool, models, feedback, privacy ledger
allow_plaintext = false                      # mqtt:// and http:// only to loopback (true: a closed lab)
trust_version = 1                            # of the [trust] keys, as provisioning returned them
trust_threshold = 1                          # signatures by them a new trust version needs (idem)

[broker]
url = "mqtts://broker.example:8883"          # mqtt:// or mqtts://, ?protocol=3.1.1 for old brokers
ca_file = "/etc/diredi-device/ca.pem"        # optional: the CA of the broker (and of the API)
keepalive_s = 30

[credentials]
file = "/etc/diredi-device/secret"           # the one-time secret from provisioning; owner-only
# or, a certificate device: the fleet CA's certificate for the key in state_dir (`diredi-device csr`)
# certificate = "/etc/diredi-device/device.pem"

[api]
url = "https://fleet.example"                # artifact downloads, with the device's credentials

[trust]                                      # the cloud's Ed25519 public keys, by key_id (the root)
"0123456789abcdef" = "base64 of the raw 32-byte key"

[input]
source = "simulated"                         # or "directory"
path = "/var/lib/diredi-device/stream.npz"   # simulated: a replayed stream; directory: where .npy land
rate_hz = 20
feedback_every = 0                           # simulated: the user labels every n-th sample

[rd]
min_samples = 20                             # never report from fewer labelled samples
new_samples = 50                             # run RD after this many new ones (0: only on command)
schedule_s = 0                               # and/or every so many seconds (0: no schedule)
epsilon = 4.0                                # optional local DP per report (omit: no DP)
budget_epsilon = 16.0                        # total ε the device may spend (with epsilon)

[status]
interval_s = 10

[enrolment]                                  # optional: enrol by claim while there is no certificate
claim_certificate = "/etc/diredi-device/claim.pem"
claim_key = "/etc/diredi-device/claim.key"
```
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broker.client import BrokerTarget
from broker.exceptions import BrokerURLError
from device_firmware_py.exceptions import ConfigError
from device_firmware_py.exitcodes import ExitCode
from wire.desired import KEY_ID_PATTERN
from wire.errors import describe
from wire.topics import DEVICE_ID_PATTERN

__all__ = [
    "ConfigError",
    "DeviceConfig",
    "ExitCode",
    "Identity",
    "load_config",
    "prepare_state_dir",
    "read_identity",
    "read_secret",
    "to_toml",
    "write_config",
]

MAX_CONFIG_BYTES = 64 * 1024
MAX_SECRET_BYTES = 1024


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BrokerConfig(_Section):
    url: str
    ca_file: Path | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)

    @field_validator("url")
    @classmethod
    def _parses(cls, url: str) -> str:
        try:
            BrokerTarget.parse(url)
        except BrokerURLError as exc:
            raise ValueError(str(exc)) from None
        if "@" in url:
            raise ValueError("must not carry credentials: they come from [credentials] file")
        return url


class CredentialsConfig(_Section):
    file: Path | None = None  # a password device's secret
    certificate: Path | None = None  # a certificate device's certificate (its key: state_dir/identity.key)

    @model_validator(mode="after")
    def _one_kind(self) -> CredentialsConfig:
        if (self.file is None) == (self.certificate is None):
            raise ValueError("give file (a password device) or certificate (a certificate device), not both")
        return self


class ApiConfig(_Section):
    url: Annotated[str, Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$", max_length=512)]
    ca_file: Path | None = None
    timeout_s: float = Field(30.0, gt=0, le=600)


class InputConfig(_Section):
    source: Literal["simulated", "directory"]
    path: Path
    rate_hz: float = Field(20.0, gt=0, le=1000)
    # simulated only: the simulated user labels every n-th sample (0: never), as feedback would
    feedback_every: int = Field(0, ge=0)


class RDConfig(_Section):
    min_samples: int = Field(20, ge=1, le=1_000_000)
    new_samples: int = Field(50, ge=0, le=1_000_000)
    schedule_s: float = Field(0.0, ge=0)
    epsilon: float | None = Field(None, gt=0, le=100)
    delta: float = Field(1e-5, gt=0, lt=1)
    budget_epsilon: float | None = Field(None, gt=0, le=10_000)

    @model_validator(mode="after")
    def _budget_with_dp(self) -> RDConfig:
        if (self.epsilon is None) != (self.budget_epsilon is None):
            raise ValueError("epsilon and budget_epsilon go together (local DP on), or neither")
        if (
            self.epsilon is not None
            and self.budget_epsilon is not None
            and self.budget_epsilon < self.epsilon
        ):
            raise ValueError("budget_epsilon is smaller than one report's epsilon")
        return self


class EnrolmentConfig(_Section):
    """Enrolment by claim: the batch's claim certificate and key from the device image, with which the
    device asks the cloud for its own certificate (its serial is its device id)."""

    claim_certificate: Path
    claim_key: Path
    poll_s: float = Field(30.0, ge=1, le=3600)  # how often it asks again while an operator decides


class StatusConfig(_Section):
    interval_s: float = Field(10.0, ge=1, le=3600)


class SpoolConfig(_Section):
    resend_after_s: float = Field(30.0, ge=1, le=86_400)
    max_mb: int = Field(64, ge=1, le=4096)


class DeviceConfig(_Section):
    """The whole file."""

    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    state_dir: Path
    # Plain mqtt:// and http:// are for this machine's loopback only (a remote host would see the
    # secret and could serve any artifact); true allows them to another host, for a closed lab network.
    allow_plaintext: bool = False
    broker: BrokerConfig
    credentials: CredentialsConfig
    api: ApiConfig
    trust: dict[Annotated[str, Field(pattern=KEY_ID_PATTERN)], str] = Field(min_length=1)
    # The trust chain's version those keys are, and how many of them must sign the next version (both
    # from provisioning); later versions come over MQTT.
    trust_version: int = Field(0, ge=0, le=(1 << 31) - 1)
    trust_threshold: int = Field(1, ge=1, le=16)
    input: InputConfig
    rd: RDConfig = RDConfig()
    status: StatusConfig = StatusConfig()
    spool: SpoolConfig = SpoolConfig()
    enrolment: EnrolmentConfig | None = None

    @field_validator("trust")
    @classmethod
    def _raw_ed25519_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        for key_id, encoded in keys.items():
            try:
                raw = base64.b64decode(encoded, validate=True)
            except binascii.Error:
                raise ValueError(f"key {key_id} is not base64") from None
            if len(raw) != 32:
                raise ValueError(f"key {key_id} is {len(raw)} bytes, an Ed25519 public key is 32")
        return keys

    @model_validator(mode="after")
    def _threshold_fits(self) -> DeviceConfig:
        if self.trust_threshold > len(self.trust):
            raise ValueError(
                f"trust_threshold {self.trust_threshold} is more than the {len(self.trust)} [trust] keys"
            )
        return self

    @model_validator(mode="after")
    def _encrypted_unless_loopback(self) -> DeviceConfig:
        if self.enrolment is not None and self.credentials.certificate is None:
            raise ValueError(
                "enrolment: it obtains a certificate: set credentials.certificate, where it goes"
            )
        if self.enrolment is not None and not self.api.url.startswith("https://"):
            raise ValueError(
                "enrolment: the claim certificate is presented over TLS: api.url must be https://"
            )
        if self.credentials.certificate is not None and not self.broker.url.startswith("mqtts://"):
            raise ValueError("broker.url: a certificate device proves who it is by TLS: use mqtts://")
        if self.allow_plaintext:
            return self
        broker = urlsplit(self.broker.url)
        if broker.scheme == "mqtt" and not _loopback(broker.hostname):
            raise ValueError(
                f"broker.url: plain mqtt:// to {broker.hostname} would send the secret unencrypted; use "
                "mqtts:// (or allow_plaintext = true on a closed lab network)"
            )
        api = urlsplit(self.api.url)
        if api.scheme == "http" and not _loopback(api.hostname):
            raise ValueError(
                f"api.url: plain http:// to {api.hostname} would send the secret unencrypted; use "
                "https:// (or allow_plaintext = true on a closed lab network)"
            )
        return self

    def trusted_keys(self) -> dict[str, bytes]:
        """The cloud's public keys, raw, by key_id."""
        return {key_id: base64.b64decode(encoded) for key_id, encoded in self.trust.items()}

    def broker_target(self, identity: Identity) -> BrokerTarget:
        """The broker, as this device."""
        target = BrokerTarget.parse(self.broker.url, ca_file=self.broker.ca_file)
        if identity.certificate is not None:
            return target.with_certificate(*identity.certificate)
        return target.with_credentials(self.device_id, identity.secret or "")


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def to_toml(config: DeviceConfig) -> str:
    """The configuration as the daemon's TOML file: what `load_config` reads back as `config`. The one
    writer of device configurations (provisioning tools, the demo, tests, benchmarks)."""
    document = config.model_dump(mode="python", exclude_none=True)
    top = [f"{key} = {_toml_value(value)}" for key, value in document.items() if not isinstance(value, dict)]
    lines = [*top, ""]
    for section, values in document.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{_toml_key(str(key))} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
    return "\n".join(lines)


def write_config(path: Path, config: DeviceConfig) -> Path:
    """Write `config` to `path` as TOML (see `to_toml`) and return the path."""
    path.write_text(to_toml(config))
    return path


def load_config(path: Path) -> DeviceConfig:
    """Read and validate the configuration file; raise ConfigError naming the key that is wrong."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes, a configuration is at most {MAX_CONFIG_BYTES}")
        document: dict[str, Any] = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return DeviceConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe(exc)}") from None


@dataclass(frozen=True)
class Identity:
    """How the device proves who it is: its password, or its certificate and key (mutual TLS)."""

    secret: str | None = None
    certificate: tuple[Path, Path] | None = None


def read_identity(config: DeviceConfig) -> Identity:
    """The device's credentials as its configuration names them, checked: ConfigError says what is wrong."""
    if config.credentials.certificate is not None:
        return Identity(certificate=check_certificate(config))
    return Identity(secret=read_secret(config))


def check_certificate(config: DeviceConfig) -> tuple[Path, Path]:
    """The device's certificate and key, if the certificate names this device, is current and certifies
    the key in the state directory (the one `diredi-device csr` made); else ConfigError."""
    from device_firmware_py.identity import KEY_FILE, certificate_problem

    path = config.credentials.certificate
    if path is None:
        raise ConfigError("credentials.certificate: not set (a password device has no certificate)")
    key = config.state_dir / KEY_FILE
    problem = certificate_problem(path, key, config.device_id)
    if problem is not None:
        raise ConfigError(f"credentials.certificate: {problem}")
    return path, key


def read_secret(config: DeviceConfig) -> str:
    """The device's secret, from a file only its owner may read (like ssh with a private key, a
    secret that others can read is refused rather than used)."""
    path = config.credentials.file
    if path is None:
        raise ConfigError("credentials.file: not set (a certificate device has no secret)")
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"credentials.file: {path} is not a regular file")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"credentials.file: {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                "chmod 600 it"
            )
        if info.st_size > MAX_SECRET_BYTES:
            raise ConfigError(f"credentials.file: {path} is larger than a secret ({info.st_size} bytes)")
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"credentials.file: {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"credentials.file: {path} is not UTF-8 text") from None
    if not secret or any(c.isspace() for c in secret):
        raise ConfigError(f"credentials.file: {path} must hold the secret alone, on one line")
    return secret


def prepare_state_dir(config: DeviceConfig) -> Path:
    """Create the state directory owner-only (0700) if needed; refuse one others can read."""
    path = config.state_dir
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"state_dir: {path} cannot be created: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"state_dir: {path} is not a directory")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"state_dir: {path} is open to others (mode {stat.S_IMODE(info.st_mode):04o}); "
            "it holds the user's private samples: chmod 700 it"
        )
    if not os.access(path, os.W_OK):
        raise ConfigError(f"state_dir: {path} is not writable")
    return path
