"""The device's own key pair, for certificate identity: made on the device, kept owner-only in its state
directory, and never sent anywhere. The cloud's fleet CA certifies it from the certificate signing
request this module writes (`diredi-device csr`), with CN = the device id.

A key that others can read, or one that is not a key, is refused rather than used (as ssh does)."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_firmware_py.exceptions import ConfigError

KEY_FILE = "identity.key"  # in the state directory
MAX_CERTIFICATE_BYTES = 16 * 1024


def device_key(state_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The device's key (EC P-256), made now if the state directory holds none; ConfigError if the file
    is open to others or is not such a key."""
    path = state_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load(path)
    key = ec.generate_private_key(ec.SECP256R1())
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return key


def signing_request(key: ec.EllipticCurvePrivateKey, device_id: str) -> str:
    """The PEM certificate signing request for `key` as device `device_id` (CN = the id)."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def _load(path: Path) -> ec.EllipticCurvePrivateKey:
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"the device key {path} is open to others (mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 it"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"the device key {path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"the device key {path} is not an EC key")
    return key


def certificate_problem(certificate: Path, key_file: Path, device_id: str) -> str | None:
    """Why the device cannot log in with `certificate` and the key in `key_file`, or None: it must
    certify that key, name `device_id` and be current."""
    try:
        data = certificate.read_bytes()[: MAX_CERTIFICATE_BYTES + 1]
    except OSError as exc:
        return f"{certificate} cannot be read: {exc.strerror or exc}"
    try:
        if len(data) > MAX_CERTIFICATE_BYTES:
            raise ValueError("too large")
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        return f"{certificate} is not a PEM certificate"
    if not key_file.exists():
        return f"there is no device key {key_file}: make it with `diredi-device csr`"
    try:
        key = _load(key_file)
    except ConfigError as exc:
        return str(exc)
    if cert.public_key() != key.public_key():
        return f"{certificate} certifies another key than the device's ({key_file})"
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        return f"{certificate} names {', '.join(map(str, names)) or 'no one'}, not {device_id}"
    now = datetime.now(UTC)
    if now >= cert.not_valid_after_utc:
        return f"{certificate} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if now < cert.not_valid_before_utc:
        since = f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        return f"{certificate} is not valid before {since} (is the clock set?)"
    return None
