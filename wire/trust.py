"""The trust chain: which Ed25519 keys sign for the fleet, and how that set changes on devices.

Modelled on TUF's root metadata. A TrustDocument is versioned and lists the keys whose signatures a
device accepts on desired models, and `threshold`: how many of them must sign the next trust document.
A device holding version N accepts version N+1 only when it carries `threshold(N)` valid signatures by
keys of N *and* `threshold(N+1)` by keys of N+1, and never goes back to an older version. So a key is
added or removed with the agreement of the keys already trusted, and one stolen key cannot rewrite the
set on its own once two keys are trusted.

The cloud publishes a TrustChain (its latest documents, oldest first) retained on `TRUST_TOPIC`, so a
device that was offline through several rotations walks the chain from the version it holds.
"""

import base64
import binascii
import hashlib
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Annotated, Literal, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from wire.desired import KEY_ID_PATTERN, canonical_json
from wire.errors import ContractError, describe
from wire.strictjson import strict_json
from wire.topics import TRUST_TOPIC

__all__ = ["TRUST_TOPIC", "TrustChain", "TrustDocument", "key_id_of", "next_trust", "strict_json"]

MAX_KEYS = 16
MAX_CHAIN = 16  # a device more versions behind than this is provisioned again
MAX_TRUST_BYTES = 64 * 1024
# How far ahead of the device's clock a document may be dated (clocks drift; NTP corrects them).
MAX_CLOCK_SKEW = timedelta(minutes=5)

KeyId = Annotated[str, Field(pattern=KEY_ID_PATTERN)]


def key_id_of(public_raw: bytes) -> str:
    """A key's id: the first 16 hex digits of the SHA-256 of its raw public key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _raw_key(encoded: str) -> str:
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError("is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"is {len(raw)} bytes, an Ed25519 public key is 32")
    return encoded


class KeySignature(BaseModel):
    """One key's Ed25519 signature over a document's canonical form."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: KeyId
    signature: str = Field(max_length=128)  # base64 of 64 bytes


class TrustDocument(BaseModel):
    """One version of the fleet's trusted signing keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["diredi.trust/1"] = Field("diredi.trust/1", alias="schema")
    version: int = Field(ge=1, le=(1 << 31) - 1)
    keys: dict[KeyId, Annotated[str, AfterValidator(_raw_key)]] = Field(min_length=1, max_length=MAX_KEYS)
    threshold: int = Field(ge=1, le=MAX_KEYS)
    issued_at: AwareDatetime
    signatures: list[KeySignature] = Field(default_factory=list, max_length=2 * MAX_KEYS)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.threshold > len(self.keys):
            raise ValueError(f"threshold {self.threshold} is more than its {len(self.keys)} keys")
        for key_id, encoded in self.keys.items():
            if key_id_of(base64.b64decode(encoded)) != key_id:
                raise ValueError(f"key {key_id} is not the id of its public key")
        return self

    def signed_bytes(self) -> bytes:
        """The RFC 8785 canonical JSON of everything but the signatures: what each key signs."""
        document = self.model_dump(mode="json", by_alias=True)
        document.pop("signatures")
        return canonical_json(document)

    def raw_keys(self) -> dict[str, bytes]:
        """The trusted raw public keys by key_id."""
        return {key_id: base64.b64decode(encoded) for key_id, encoded in self.keys.items()}

    def signers(self, keys: Mapping[str, bytes]) -> set[str]:
        """The ids of those of `keys` whose signature on this document verifies."""
        message = self.signed_bytes()
        valid = set()
        for entry in self.signatures:
            key = keys.get(entry.key_id)
            if key is None or entry.key_id in valid:
                continue
            try:
                signature = base64.b64decode(entry.signature, validate=True)
                Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
            except (InvalidSignature, binascii.Error, ValueError):
                continue
            valid.add(entry.key_id)
        return valid


class TrustChain(BaseModel):
    """The latest trust documents, oldest first, consecutive versions: what `TRUST_TOPIC` carries."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["diredi.trust-chain/1"] = Field("diredi.trust-chain/1", alias="schema")
    documents: list[TrustDocument] = Field(min_length=1, max_length=MAX_CHAIN)

    @model_validator(mode="after")
    def _consecutive(self) -> Self:
        versions = [document.version for document in self.documents]
        if versions != list(range(versions[0], versions[0] + len(versions))):
            raise ValueError(f"versions {versions} are not consecutive and ascending")
        return self

    @property
    def latest(self) -> TrustDocument:
        return self.documents[-1]

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_bytes(cls, payload: bytes | str) -> "TrustChain":
        """Parse a received chain (strict JSON); a violation is a ContractError naming the field."""
        size = len(payload.encode() if isinstance(payload, str) else payload)
        if size > MAX_TRUST_BYTES:
            raise ContractError(f"trust chain of {size} bytes exceeds {MAX_TRUST_BYTES}")
        document = strict_json(payload)
        try:
            return cls.model_validate(document)
        except ValidationError as exc:
            raise ContractError(f"invalid trust chain at {describe(exc)}") from None


def check_issued_at(issued_at: datetime, now: datetime, what: str) -> None:
    """Raise ContractError if `issued_at` lies further in the future of `now` than clocks drift: a
    document dated ahead would otherwise make every later one look like a replay."""
    if issued_at > now + MAX_CLOCK_SKEW:
        raise ContractError(
            f"{what} is dated {issued_at.isoformat()}, in the future of this device's clock "
            f"({now.isoformat()})"
        )


def next_trust(
    keys: Mapping[str, bytes], threshold: int, version: int, chain: TrustChain, now: datetime
) -> TrustDocument | None:
    """The newest document of `chain` a holder of (`keys`, `threshold`, `version`) reaches by walking
    it one version at a time, or None when the chain holds nothing newer. Raises ContractError when
    the next version is missing or one step does not verify (nothing of the chain is taken then)."""
    if chain.latest.version <= version:
        return None
    if chain.documents[0].version > version + 1:
        raise ContractError(
            f"trust chain starts at version {chain.documents[0].version}; this device holds {version} "
            "and needs every version after it (provision it again)"
        )
    reached: TrustDocument | None = None
    for document in chain.documents:
        if document.version <= version:
            continue
        check_issued_at(document.issued_at, now, f"trust document {document.version}")
        by_old = document.signers(keys)
        if len(by_old) < threshold:
            raise ContractError(
                f"trust document {document.version} has {len(by_old)} valid signatures by the keys of "
                f"version {version}, {threshold} needed"
            )
        by_new = document.signers(document.raw_keys())
        if len(by_new) < document.threshold:
            raise ContractError(
                f"trust document {document.version} has {len(by_new)} valid signatures by its own keys, "
                f"{document.threshold} needed"
            )
        keys, threshold, version = document.raw_keys(), document.threshold, document.version
        reached = document
    return reached
