"""DesiredModel (DESIGN §2): the signed document that tells one device which model to run."""

import base64
import binascii
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, Self

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wire.common import DeviceId, ModelId, utcnow
from wire.errors import ContractError, UnknownKeyError, describe
from wire.manifest import ArtifactManifest
from wire.strictjson import strict_json

KEY_ID_PATTERN = r"^[0-9a-f]{16}$"
SIGNATURE_FIELD = "signature"


# Stands in for the manifest while the rest of a document is made canonical (no other field may hold
# a NUL: device ids, model ids, paths and key ids all have patterns), and how RFC 8785 writes it.
_MANIFEST_SLOT = "\x00manifest"
_MANIFEST_MARKER = rfc8785.dumps(_MANIFEST_SLOT)


def signing_bytes(document: dict[str, Any], *, canonical_manifest: bytes | None = None) -> bytes:
    """The RFC 8785 canonical JSON of everything in `document` but its signature: what is signed.

    `canonical_manifest`, the canonical JSON of the document's manifest when the caller has it (a
    rollout signs one manifest for many devices, and the manifest is most of the work), is spliced in
    where the manifest goes rather than made again: RFC 8785 writes a member's value independently of
    its siblings, so the result is the same bytes. It is trusted to be that manifest's: a signer
    passes what it made from the same document (a wrong one signs bytes no device will match).
    """
    unsigned = {k: v for k, v in document.items() if k != SIGNATURE_FIELD}
    if canonical_manifest is None or "manifest" not in unsigned:
        return canonical_json(unsigned)
    head, slot, tail = canonical_json({**unsigned, "manifest": _MANIFEST_SLOT}).partition(_MANIFEST_MARKER)
    if not slot or _MANIFEST_MARKER in tail:  # not one slot: another field held the marker
        return canonical_json(unsigned)
    return head + canonical_manifest + tail


def canonical_json(value: Any) -> bytes:
    """RFC 8785 canonical JSON of a JSON value (e.g. a manifest's `model_dump(mode="json")`)."""
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise ContractError(f"desired model cannot be canonicalized: {exc}") from None


class DesiredModel(BaseModel):
    """What one device should run, signed by the cloud with the Ed25519 key named by `key_id`."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["diredi.desired/1"] = Field("diredi.desired/1", alias="schema")
    device_id: DeviceId
    manifest: ArtifactManifest
    download_path: str = Field(pattern=r"^/api/v1/artifacts/[0-9a-f]{64}$")
    rollback_of: ModelId | None = None
    issued_at: datetime = Field(default_factory=utcnow)
    key_id: str = Field(pattern=KEY_ID_PATTERN)
    signature: str = Field("", max_length=128)  # base64 of the 64-byte Ed25519 signature

    @model_validator(mode="after")
    def _path_names_the_artifact(self) -> Self:
        if self.download_path != f"/api/v1/artifacts/{self.manifest.sha256}":
            raise ValueError("download_path does not name the manifest's artifact")
        return self

    def unsigned_document(self) -> dict[str, Any]:
        """The JSON document without its signature."""
        document = self.model_dump(mode="json", by_alias=True)
        document.pop(SIGNATURE_FIELD)
        return document

    def to_json(self) -> str:
        """The document as sent on `model/desired`."""
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_bytes(cls, payload: bytes | str) -> "DesiredModel":
        """Parse a received document; a violation is a ContractError naming the field."""
        try:
            return cls.model_validate_json(payload)
        except ValidationError as exc:
            raise ContractError(f"invalid desired model at {describe(exc)}") from None

    def verify(self, trusted: Mapping[str, bytes]) -> None:
        """Check the signature against the trusted raw Ed25519 public keys by key_id; raise ContractError."""
        _check_signature(self.key_id, self.signature, signing_bytes(self.unsigned_document()), trusted)


def verify_raw(payload: bytes, trusted: Mapping[str, bytes]) -> DesiredModel:
    """Parse and verify a received document, checking the signature over the fields as sent (strict
    JSON: with duplicate keys, what was signed and what is read could differ)."""
    document = strict_json(payload)
    model = DesiredModel.from_bytes(payload)
    _check_signature(model.key_id, model.signature, signing_bytes(document), trusted)
    return model


def _check_signature(key_id: str, signature: str, message: bytes, trusted: Mapping[str, bytes]) -> None:
    key = trusted.get(key_id)
    if key is None:
        raise UnknownKeyError(f"desired model signed with unknown key_id {key_id}")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, binascii.Error, ValueError):
        raise ContractError("desired model signature does not verify") from None
