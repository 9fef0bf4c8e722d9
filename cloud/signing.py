"""The cloud's Ed25519 signing keys: created on first start, rotatable, exported for device provisioning.

Layout of the key directory (owner-only): `<key_id>.key` private keys (PKCS#8 PEM), `<key_id>.pub`
public keys still trusted, `active` naming the key that signs. Rotating adds a key and makes it
active; the old public key stays trusted until it is retired, so devices accept both meanwhile.
"""

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.exceptions import InsecureFileError, SigningError
from cloud.filemodes import check_private
from wire.desired import KEY_ID_PATTERN, DesiredModel, canonical_json, signing_bytes
from wire.manifest import ArtifactManifest

log = logging.getLogger(__name__)


def key_id_of(public_raw: bytes) -> str:
    """A key's id: the first 16 hex digits of the SHA-256 of its raw public key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


@dataclass(frozen=True)
class PublicKey:
    """A trusted public key, as a device is provisioned with it."""

    key_id: str
    public_key: str  # base64 of the 32-byte raw Ed25519 key
    active: bool


class Desired(NamedTuple):
    """The model one device should run, and the model it replaces if that is a rollback."""

    device_id: str
    manifest: ArtifactManifest
    rollback_of: str | None = None


class KeyRing:
    """The signing keys in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def open(cls, directory: Path) -> "KeyRing":
        """Open the key ring, creating its first key when the directory holds none."""
        ring = cls(directory)
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        with ring._locked():  # several API workers may start on a fresh directory at once
            if not (directory / "active").exists():
                ring._rotate()
        for path in sorted(directory.glob("*.key")):
            try:
                check_private(path, "the signing key")
            except InsecureFileError as exc:
                raise SigningError(str(exc)) from None
        return ring

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.directory / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def rotate(self) -> str:
        """Create a new key and make it the active one; return its key_id."""
        with self._locked():
            return self._rotate()

    def _rotate(self) -> str:
        key = Ed25519PrivateKey.generate()
        public_raw = _public_raw(key)
        key_id = key_id_of(public_raw)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_private(self.directory / f"{key_id}.key", pem)
        (self.directory / f"{key_id}.pub").write_text(base64.b64encode(public_raw).decode() + "\n")
        tmp = self.directory / "active.tmp"
        tmp.write_text(key_id + "\n")
        tmp.replace(self.directory / "active")
        log.info("signing key %s is now active", key_id)  # the id only, never the key
        return key_id

    @property
    def active_key_id(self) -> str:
        """The key_id of the key that signs."""
        try:
            key_id = (self.directory / "active").read_text().strip()
        except FileNotFoundError:
            raise SigningError(f"no active signing key in {self.directory}") from None
        if not _valid_key_id(key_id):
            raise SigningError(f"{self.directory / 'active'} does not name a key")
        return key_id

    def _private(self, key_id: str) -> Ed25519PrivateKey:
        try:
            key = serialization.load_pem_private_key((self.directory / f"{key_id}.key").read_bytes(), None)
        except (FileNotFoundError, ValueError) as exc:
            raise SigningError(
                f"signing key {key_id} is missing or unreadable: {type(exc).__name__}"
            ) from None
        if not isinstance(key, Ed25519PrivateKey) or key_id_of(_public_raw(key)) != key_id:
            raise SigningError(f"signing key file {key_id}.key does not hold key {key_id}")
        return key

    def retire(self, key_id: str) -> None:
        """Stop trusting a key that no longer signs (devices re-provisioned with the new set)."""
        with self._locked():
            if key_id == self.active_key_id:
                raise SigningError("the active key cannot be retired; rotate first")
            if not _valid_key_id(key_id) or not (self.directory / f"{key_id}.pub").is_file():
                raise SigningError(f"no trusted key {key_id[:40]!r} to retire")
            for suffix in (".key", ".pub"):
                (self.directory / f"{key_id}{suffix}").unlink(missing_ok=True)

    def public_keys(self) -> list[PublicKey]:
        """Every trusted public key, the active one marked."""
        active = self.active_key_id
        keys = []
        for path in sorted(self.directory.glob("*.pub")):
            if _valid_key_id(path.stem):
                keys.append(PublicKey(path.stem, path.read_text().strip(), path.stem == active))
        return keys

    def trusted(self) -> dict[str, bytes]:
        """The trusted raw public keys by key_id, as a device holds them."""
        return {k.key_id: base64.b64decode(k.public_key) for k in self.public_keys()}

    def sign_desired(
        self,
        *,
        device_id: str,
        manifest: ArtifactManifest,
        rollback_of: str | None = None,
        issued_at: datetime | None = None,
    ) -> DesiredModel:
        """A DesiredModel for one device, signed with the active key."""
        return self.sign_desired_many([Desired(device_id, manifest, rollback_of)], issued_at=issued_at)[0]

    def sign_desired_many(
        self, wanted: Sequence[Desired], *, issued_at: datetime | None = None
    ) -> list[DesiredModel]:
        """A DesiredModel for each device, signed with the active key: the key is read once, and each
        manifest made canonical once (for a wave it is one manifest, and most of the signed bytes)."""
        key_id = self.active_key_id
        key = self._private(key_id)
        canonical: dict[int, bytes] = {}  # by id() of the manifest, which the signed documents hold
        signed = []
        for device_id, manifest, rollback_of in wanted:
            fields: dict[str, Any] = {
                "device_id": device_id,
                "manifest": manifest,
                "rollback_of": rollback_of,
                "key_id": key_id,
                "download_path": f"/api/v1/artifacts/{manifest.sha256}",
            }
            if issued_at is not None:
                fields["issued_at"] = issued_at
            unsigned = DesiredModel.model_validate(fields)
            document = unsigned.unsigned_document()
            if id(manifest) not in canonical:
                canonical[id(manifest)] = canonical_json(document["manifest"])
            to_sign = signing_bytes(document, canonical_manifest=canonical[id(manifest)])
            signature = base64.b64encode(key.sign(to_sign)).decode()
            signed.append(unsigned.model_copy(update={"signature": signature}))
        return signed


def _valid_key_id(text: str) -> bool:
    return re.fullmatch(KEY_ID_PATTERN, text) is not None
