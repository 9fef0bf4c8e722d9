"""wire.DesiredModel: RFC 8785 signing bytes, signature checks, verify_raw on the bytes as sent, parsing."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.cloud.factories import make_manifest
from wire import ContractError, DesiredModel
from wire.desired import signing_bytes, verify_raw
from wire.errors import UnknownKeyError

BLOB = b"an int8 flatbuffer" * 50
MANIFEST = make_manifest(BLOB, line="kitchen", version=2)
SHA = MANIFEST.sha256
OTHER_SHA = hashlib.sha256(b"another artifact").hexdigest()


def key_id_of(key: Ed25519PrivateKey) -> str:
    """The key's id as the cloud names it: 16 hex digits of the SHA-256 of the raw public key."""
    return hashlib.sha256(public_raw(key)).hexdigest()[:16]


def public_raw(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of the key's public half."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(key: Ed25519PrivateKey, **fields: Any) -> DesiredModel:
    """A DesiredModel for cam-a signed with `key`, the way the cloud signs it."""
    values: dict[str, Any] = {
        "device_id": "cam-a",
        "manifest": MANIFEST,
        "download_path": f"/api/v1/artifacts/{SHA}",
        "key_id": key_id_of(key),
        **fields,
    }
    unsigned = DesiredModel.model_validate(values)
    signature = key.sign(signing_bytes(unsigned.unsigned_document()))
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


@pytest.fixture
def key() -> Ed25519PrivateKey:
    """A fresh signing key."""
    return Ed25519PrivateKey.generate()


@pytest.fixture
def trusted(key: Ed25519PrivateKey) -> dict[str, bytes]:
    """What a device provisioned with `key` trusts."""
    return {key_id_of(key): public_raw(key)}


def reordered(value: Any) -> Any:
    """The same JSON value with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(v) for v in value]
    return value


def test_signing_bytes_are_rfc8785_of_everything_but_the_signature(key: Ed25519PrivateKey) -> None:
    # Prepare
    document: dict[str, Any] = json.loads(sign(key).to_json())

    # Execute
    signed = signing_bytes(document)

    # Assert
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    assert signed == rfc8785.dumps(unsigned)
    assert signed == signing_bytes(reordered(unsigned))
    assert "signature" not in json.loads(signed)
    assert document["signature"] and document["schema"] == "diredi.desired/1"


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"rollback_of": "kitchen.v1"},
        {"device_id": "z" * 63},
    ],
)
def test_a_manifest_made_canonical_once_gives_the_same_signing_bytes(
    key: Ed25519PrivateKey, fields: dict[str, Any]
) -> None:
    # Prepare
    document: dict[str, Any] = json.loads(sign(key, **fields).to_json())
    manifest = rfc8785.dumps(document["manifest"])

    # Execute
    spliced = signing_bytes(document, canonical_manifest=manifest)

    # Assert
    assert spliced == signing_bytes(document)


def test_a_signed_document_verifies(key: Ed25519PrivateKey, trusted: dict[str, bytes]) -> None:
    # Prepare
    document = sign(key, rollback_of="kitchen.v3")

    # Execute / Assert
    document.verify(trusted)
    assert verify_raw(document.to_json().encode(), trusted) == document


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device_id", "cam-b"),
        ("manifest", MANIFEST.model_copy(update={"sha256": OTHER_SHA})),
        ("rollback_of", "kitchen.v1"),
        ("download_path", f"/api/v1/artifacts/{OTHER_SHA}"),
    ],
)
def test_a_changed_field_does_not_verify(
    key: Ed25519PrivateKey, trusted: dict[str, bytes], field: str, value: Any
) -> None:
    # Prepare
    document = sign(key)

    # Execute
    forged = document.model_copy(update={field: value})

    # Assert
    with pytest.raises(ContractError, match="does not verify"):
        forged.verify(trusted)


def test_an_unknown_key_id_is_refused(key: Ed25519PrivateKey) -> None:
    # Prepare
    document = sign(key)
    stranger = Ed25519PrivateKey.generate()

    # Execute / Assert
    with pytest.raises(ContractError, match="unknown key_id"):
        document.verify({})
    with pytest.raises(ContractError, match="unknown key_id"):
        document.verify({key_id_of(stranger): public_raw(stranger)})
    with pytest.raises(ContractError, match="unknown key_id"):
        verify_raw(document.to_json().encode(), {})


def test_a_signature_by_another_key_is_refused(key: Ed25519PrivateKey, trusted: dict[str, bytes]) -> None:
    # Prepare: the right key_id, but the bytes were signed by an impostor's key
    document = sign(key)
    impostor = Ed25519PrivateKey.generate()
    forged_signature = impostor.sign(signing_bytes(document.unsigned_document()))
    forged = document.model_copy(update={"signature": base64.b64encode(forged_signature).decode()})

    # Execute / Assert
    with pytest.raises(ContractError, match="does not verify"):
        forged.verify(trusted)
    with pytest.raises(ContractError, match="does not verify"):
        verify_raw(forged.to_json().encode(), trusted)


@pytest.mark.parametrize(
    "signature",
    ["", "not base64!", "AAAA", "====", base64.b64encode(bytes(64)).decode(), "é" * 10],
)
def test_a_garbage_signature_is_refused(
    key: Ed25519PrivateKey, trusted: dict[str, bytes], signature: str
) -> None:
    # Prepare
    document = sign(key).model_copy(update={"signature": signature})

    # Execute / Assert
    with pytest.raises(ContractError, match="does not verify"):
        document.verify(trusted)


def test_verify_raw_accepts_any_spelling_of_the_same_json(
    key: Ed25519PrivateKey, trusted: dict[str, bytes]
) -> None:
    # Prepare: other key order, whitespace, escapes and number spelling; RFC 8785 makes them one
    document = sign(key)
    text = json.dumps(reordered(json.loads(document.to_json())), indent=3, ensure_ascii=True)
    text = text.replace('"scale": 0.05', '"scale": 5.0E-2').replace('"cam-a"', '"cam\\u002da"')
    assert "5.0E-2" in text and "cam\\u002da" in text

    # Execute
    parsed = verify_raw(text.encode(), trusted)

    # Assert
    assert parsed == document


@pytest.mark.parametrize(
    "changes",
    [
        {("device_id",): "cam-b"},
        {("issued_at",): "2030-01-01T00:00:00Z"},
        {("rollback_of",): "kitchen.v1"},
        {("manifest", "size"): len(BLOB) + 1},
        {("manifest", "sha256"): OTHER_SHA, ("download_path",): f"/api/v1/artifacts/{OTHER_SHA}"},
        {("manifest", "input", "scale"): 0.06},
    ],
)
def test_verify_raw_refuses_a_changed_value(
    key: Ed25519PrivateKey, trusted: dict[str, bytes], changes: dict[tuple[str, ...], Any]
) -> None:
    # Prepare
    document: dict[str, Any] = json.loads(sign(key).to_json())
    for path, value in changes.items():
        parent = document
        for name in path[:-1]:
            parent = parent[name]
        parent[path[-1]] = value

    # Execute / Assert
    with pytest.raises(ContractError, match="does not verify"):
        verify_raw(json.dumps(document).encode(), trusted)


def test_verify_raw_checks_the_fields_as_sent_not_as_parsed(
    key: Ed25519PrivateKey, trusted: dict[str, bytes]
) -> None:
    # Prepare: the same instant spelled with another offset parses equal but was not what was signed
    document = sign(key)
    sent: dict[str, Any] = json.loads(document.to_json())
    assert sent["issued_at"].endswith("Z")
    sent["issued_at"] = sent["issued_at"].replace("Z", "+00:00")

    # Execute / Assert
    assert DesiredModel.from_bytes(json.dumps(sent)) == document
    with pytest.raises(ContractError, match="does not verify"):
        verify_raw(json.dumps(sent).encode(), trusted)


def test_verify_raw_refuses_a_number_it_cannot_canonicalize(
    key: Ed25519PrivateKey, trusted: dict[str, bytes]
) -> None:
    # Prepare: 2**60 is a valid size to pydantic but outside RFC 8785's (I-JSON's) integer range
    document: dict[str, Any] = json.loads(sign(key).to_json())
    document["manifest"]["size"] = 2**60

    # Execute / Assert: a garbled document is a ContractError, like every other one
    with pytest.raises(ContractError):
        verify_raw(json.dumps(document).encode(), trusted)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"not json", "(top level)"),
        (b"[]", "(top level)"),
        (b"{}", "device_id"),
    ],
)
def test_from_bytes_on_garbage_is_a_contract_error(payload: bytes, field: str) -> None:
    # Execute / Assert
    with pytest.raises(ContractError, match="invalid desired model") as caught:
        DesiredModel.from_bytes(payload)
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device_id", "Cam_A"),
        ("key_id", "not-a-key-id"),
        ("schema", "diredi.desired/2"),
        ("issued_at", "yesterday"),
        ("signature", "A" * 129),
        ("rollback_of", "../kitchen"),
        ("surprise", 1),
    ],
)
def test_from_bytes_names_the_bad_field(key: Ed25519PrivateKey, field: str, value: Any) -> None:
    # Prepare
    document: dict[str, Any] = json.loads(sign(key).to_json())
    document[field] = value

    # Execute / Assert
    with pytest.raises(ContractError, match=f"invalid desired model at {field}"):
        DesiredModel.from_bytes(json.dumps(document))


def test_from_bytes_names_a_missing_field(key: Ed25519PrivateKey) -> None:
    # Prepare
    document: dict[str, Any] = json.loads(sign(key).to_json())
    del document["key_id"]

    # Execute / Assert
    with pytest.raises(ContractError, match="key_id"):
        DesiredModel.from_bytes(json.dumps(document).encode())


@pytest.mark.parametrize(
    "path",
    [
        f"/api/v1/artifacts/{SHA.upper()}",
        f"/api/v1/artifacts/{SHA[:63]}",
        f"/api/v1/artifacts/{SHA}/x",
        f"/api/v1/artifacts/../../{SHA[:58]}",
        f"https://elsewhere.example/api/v1/artifacts/{SHA}",
        f"/api/v2/artifacts/{SHA}",
        "/api/v1/artifacts/",
    ],
)
def test_download_path_must_be_an_artifact_path(key: Ed25519PrivateKey, path: str) -> None:
    # Prepare
    document: dict[str, Any] = json.loads(sign(key).to_json())
    document["download_path"] = path

    # Execute / Assert
    with pytest.raises(ContractError, match="download_path"):
        DesiredModel.from_bytes(json.dumps(document))


def test_download_path_must_name_the_manifests_artifact(key: Ed25519PrivateKey) -> None:
    # Prepare: a well-formed path, but to another artifact than the one the manifest describes
    document: dict[str, Any] = json.loads(sign(key).to_json())
    document["download_path"] = f"/api/v1/artifacts/{OTHER_SHA}"

    # Execute / Assert
    with pytest.raises(ContractError, match="download_path"):
        DesiredModel.from_bytes(json.dumps(document))


@pytest.mark.parametrize(
    ("field", "other"),
    [('"device_id":"cam-a"', '"device_id":"cam-b"'), ('"rollback_of":null', '"rollback_of":"kitchen.v1"')],
)
def test_verify_raw_refuses_duplicate_keys(
    key: Ed25519PrivateKey, trusted: dict[str, bytes], field: str, other: str
) -> None:
    # Prepare: the signature covers one value; a lenient parser would read the other
    sent = sign(key).to_json()
    assert field in sent
    doubled = sent.replace(field, f"{field},{other}", 1)

    # Execute / Assert
    with pytest.raises(ContractError, match="duplicate key"):
        verify_raw(doubled.encode(), trusted)
    with pytest.raises(ContractError, match="duplicate key"):
        verify_raw(sent.replace(field, f"{other},{field}", 1).encode(), trusted)


def test_an_unknown_key_is_an_unknown_key_error_and_a_bad_signature_is_not(
    key: Ed25519PrivateKey, trusted: dict[str, bytes]
) -> None:
    # Prepare: the updater applies a document of an unknown key again after a trust update, never a forgery
    document = sign(key)
    forged = document.model_copy(update={"device_id": "cam-b"})

    # Execute
    with pytest.raises(UnknownKeyError) as unknown:
        verify_raw(document.to_json().encode(), {})
    with pytest.raises(ContractError) as bad:
        verify_raw(forged.to_json().encode(), trusted)

    # Assert
    assert isinstance(unknown.value, ContractError)
    assert f"unknown key_id {key_id_of(key)}" in str(unknown.value)
    assert not isinstance(bad.value, UnknownKeyError)
