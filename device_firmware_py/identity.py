"""The device's own key pair, for certificate identity: made on the device, kept owner-only in its state
directory, and never sent anywhere. The cloud's fleet CA certifies it from the certificate signing
request this module writes (`diredi-device csr`), with CN = the device id.

A key that others can read, or one that is not a key, is refused rather than used (as ssh does)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_firmware_py.exceptions import ConfigError

KEY_FILE = "identity.key"  # in the state directory


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
