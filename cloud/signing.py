"""The cloud's Ed25519 signing keys and the trust chain that carries them to devices.

Layout of the key directory (owner-only): `<key_id>.key` private keys (PKCS#8 PEM) and `<key_id>.pub`
their public halves, `active` naming the key that signs desired models, `trust/<version>.json` the
signed trust documents (wire/trust.py), the newest of which says which keys devices trust. A rotation
stages a new key (trusted, not yet signing), the fleet learns it from the chain, then it is activated;
a revoked key leaves the trust set, so devices refuse what it signs (docs/security.md).
"""

import base64
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from cloud.exceptions import InsecureFileError, SigningError
from cloud.filemodes import check_private, directory_lock, write_private
from wire.common import utcnow
from wire.desired import KEY_ID_PATTERN, DesiredModel, canonical_json, signing_bytes
from wire.errors import ContractError
from wire.manifest import ArtifactManifest
from wire.strictjson import strict_json
from wire.trust import MAX_CHAIN, KeySignature, TrustChain, TrustDocument, key_id_of

log = logging.getLogger(__name__)
TRUST_DIR = "trust"


def _public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
    """The signing keys in one directory, and the trust chain that tells devices which keys to trust.

    A key is *trusted* when the latest trust document lists it, and *active* when it signs desired
    models. `stage` adds a key to the trust set without making it active, so devices learn it first;
    `activate` makes it sign; `revoke` removes a key from the trust set (and from the disk).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def open(cls, directory: Path) -> "KeyRing":
        """Open the key ring, creating its first key (and trust document) when the directory holds none."""
        ring = cls(directory)
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        with directory_lock(directory):  # several API workers may start on a fresh directory at once
            if not (directory / "active").exists():
                ring._set_active(ring._new_key())
            if not ring._trust_files():
                # The first trust document (or a key ring from before trust documents): every key here.
                keys = {path.stem: path.read_text().strip() for path in sorted(directory.glob("*.pub"))}
                try:
                    ring._issue({k: v for k, v in keys.items() if _valid_key_id(k)}, previous=None)
                except ValidationError as exc:
                    raise SigningError(
                        f"the public keys in {directory} do not make a trust document: {exc}"
                    ) from None
        for path in sorted(directory.glob("*.key")):
            try:
                check_private(path, "the signing key")
            except InsecureFileError as exc:
                raise SigningError(str(exc)) from None
        return ring

    # --- keys --------------------------------------------------------------------------------------

    def stage(self) -> str:
        """Create a new key and add it to the trust set without making it active; return its key_id.
        Devices learn it from the trust chain; `activate` makes it sign once they have."""
        with directory_lock(self.directory):
            key_id = self._new_key()
            latest = self.trust()
            try:
                self._issue({**latest.keys, key_id: self._public_b64(key_id)}, previous=latest)
            except SigningError:
                for suffix in (".key", ".pub"):  # a key no trust document names must not linger
                    (self.directory / f"{key_id}{suffix}").unlink(missing_ok=True)
                raise
            return key_id

    def rotate(self) -> str:
        """Stage a new key and make it active at once (devices that do not trust it yet refuse what it
        signs until the trust chain reaches them); return its key_id."""
        key_id = self.stage()
        self.activate(key_id)
        return key_id

    def activate(self, key_id: str) -> None:
        """Make a trusted key the one that signs."""
        with directory_lock(self.directory):
            if key_id not in self.trust().keys:
                raise SigningError(f"no trusted key {key_id[:40]!r} to activate")
            self._private(key_id)  # held, and the file holds that key
            self._set_active(key_id)

    def revoke(self, key_id: str) -> None:
        """Remove a key from the trust set, so devices refuse what it signs, and delete it here. A
        revoked active key hands signing to the newest other trusted key."""
        with directory_lock(self.directory):
            latest = self.trust()
            if not _valid_key_id(key_id) or key_id not in latest.keys:
                raise SigningError(f"no trusted key {key_id[:40]!r} to revoke")
            remaining = {k: v for k, v in latest.keys.items() if k != key_id}
            if not remaining:
                raise SigningError("the only trusted key cannot be revoked; stage another first")
            successor = None
            if key_id == self.active_key_id:
                held = [k for k in self._introduced(latest) if k in remaining and self._holds(k)]
                if not held:
                    raise SigningError("no other trusted key is held here to take over signing")
                successor = held[-1]
            self._issue(remaining, previous=latest)  # first: if it is refused, nothing has changed
            if successor is not None:
                self._set_active(successor)
            for suffix in (".key", ".pub"):
                (self.directory / f"{key_id}{suffix}").unlink(missing_ok=True)
            log.warning("signing key %s revoked (trust version %d)", key_id, latest.version + 1)

    def retire(self, key_id: str) -> None:
        """Revoke a key that no longer signs."""
        if key_id == self.active_key_id:
            raise SigningError("the active key cannot be retired; activate another first")
        self.revoke(key_id)

    def staged(self) -> tuple[str, int] | None:
        """The newest trusted key that is not active but was added after it, with the trust version that
        added it: the key waiting for the fleet to trust it. None when there is none."""
        latest = self.trust()
        introduced = self._introduced(latest)
        active = self.active_key_id
        order = list(introduced)
        waiting = [k for k in order if order.index(k) > order.index(active)] if active in order else []
        return (waiting[-1], introduced[waiting[-1]]) if waiting else None

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

    def public_keys(self) -> list[PublicKey]:
        """Every trusted public key, the active one marked."""
        active = self.active_key_id
        return [PublicKey(k, v, k == active) for k, v in sorted(self.trust().keys.items())]

    def trusted(self) -> dict[str, bytes]:
        """The trusted raw public keys by key_id, as a device holds them."""
        return self.trust().raw_keys()

    # --- the trust chain ---------------------------------------------------------------------------

    def trust(self) -> TrustDocument:
        """The latest trust document."""
        files = self._trust_files()
        if not files:
            raise SigningError(f"no trust document in {self.directory / TRUST_DIR}")
        return self._read_trust(files[-1])

    def trust_chain(self) -> TrustChain:
        """The latest trust documents (at most MAX_CHAIN), oldest first: what devices are sent."""
        return TrustChain(documents=[self._read_trust(p) for p in self._trust_files()[-MAX_CHAIN:]])

    def _trust_files(self) -> list[Path]:
        return sorted((self.directory / TRUST_DIR).glob("*.json"))

    def _read_trust(self, path: Path) -> TrustDocument:
        try:
            return TrustDocument.model_validate(strict_json(path.read_bytes()))
        except (OSError, ContractError, ValidationError) as exc:
            raise SigningError(f"trust document {path} is unreadable: {type(exc).__name__}") from None

    def _introduced(self, latest: TrustDocument) -> dict[str, int]:
        """The keys of `latest` by the trust version that added them, oldest first."""
        found: dict[str, int] = {}
        for path in self._trust_files():
            for key_id in self._read_trust(path).keys:
                found.setdefault(key_id, int(path.stem))
        return {k: v for k, v in sorted(found.items(), key=lambda kv: kv[1]) if k in latest.keys}

    def _issue(self, keys: dict[str, str], previous: TrustDocument | None) -> TrustDocument:
        """Write the next trust document, listing `keys`, signed by every key held here of the previous
        and the new set; refuse if those signatures do not meet either set's threshold."""
        document = TrustDocument(
            version=1 if previous is None else previous.version + 1,
            keys=keys,
            threshold=min(2, len(keys)),  # one stolen key alone cannot rewrite the set
            issued_at=utcnow(),
        )
        message = document.signed_bytes()
        signers = sorted(k for k in {**(previous.keys if previous else {}), **keys} if self._holds(k))
        signatures = [
            KeySignature(key_id=k, signature=base64.b64encode(self._private(k).sign(message)).decode())
            for k in signers
        ]
        document = document.model_copy(update={"signatures": signatures})
        for needed, keyset, name in (
            (previous.threshold if previous else 0, previous.raw_keys() if previous else {}, "the trusted"),
            (document.threshold, document.raw_keys(), "the new"),
        ):
            if len(document.signers(keyset)) < needed:
                raise SigningError(f"the keys held here cannot sign for {needed} of {name} keys")
        path = self.directory / TRUST_DIR / f"{document.version:08d}.json"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        _replace(path, document.model_dump_json(by_alias=True))
        log.info("trust version %d: keys %s", document.version, ", ".join(sorted(keys)))
        return document

    # --- files -------------------------------------------------------------------------------------

    def _new_key(self) -> str:
        key = Ed25519PrivateKey.generate()
        public_raw = _public_raw(key)
        key_id = key_id_of(public_raw)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(self.directory / f"{key_id}.key", pem)
        (self.directory / f"{key_id}.pub").write_text(base64.b64encode(public_raw).decode() + "\n")
        return key_id

    def _set_active(self, key_id: str) -> None:
        _replace(self.directory / "active", key_id + "\n")
        log.info("signing key %s is now active", key_id)  # the id only, never the key

    def _public_b64(self, key_id: str) -> str:
        return base64.b64encode(_public_raw(self._private(key_id))).decode()

    def _holds(self, key_id: str) -> bool:
        return (self.directory / f"{key_id}.key").is_file()

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
