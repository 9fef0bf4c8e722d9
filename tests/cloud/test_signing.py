"""The cloud's KeyRing: key files and modes, signed DesiredModels that verify, rotation, retirement, logs."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.exceptions import SigningError
from cloud.signing import Desired, KeyRing
from tests.cloud.factories import make_manifest
from wire import ContractError, DesiredModel
from wire.desired import verify_raw
from wire.manifest import ArtifactManifest

BLOB = b"an int8 flatbuffer" * 50
OTHER_SHA = hashlib.sha256(b"another artifact").hexdigest()


def manifest(version: int = 2) -> ArtifactManifest:
    """A valid manifest of the kitchen line."""
    return make_manifest(BLOB, line="kitchen", version=version)


def mode(path: Path) -> int:
    """The permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)


def private_secrets(directory: Path) -> list[str]:
    """Every spelling of every private key in the directory that could leak into a log."""
    spellings = []
    for path in directory.glob("*.key"):
        pem = path.read_bytes()
        key = serialization.load_pem_private_key(pem, None)
        assert isinstance(key, Ed25519PrivateKey)
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        body = "".join(pem.decode().splitlines()[1:-1])
        spellings += [body, raw.hex(), base64.b64encode(raw).decode(), repr(raw)]
    return spellings


def test_first_open_creates_one_owner_only_key(tmp_path: Path) -> None:
    # Prepare
    directory = tmp_path / "keys"

    # Execute
    ring = KeyRing.open(directory)

    # Assert
    key_id = ring.active_key_id
    assert re.fullmatch(r"[0-9a-f]{16}", key_id)
    assert mode(directory) == 0o700
    assert mode(directory / f"{key_id}.key") == 0o600
    assert {p.name for p in directory.iterdir()} == {
        ".lock",
        "active",
        f"{key_id}.key",
        f"{key_id}.pub",
        "trust",
    }
    assert [p.name for p in (directory / "trust").iterdir()] == ["00000001.json"]
    assert (ring.trust().version, ring.trust().threshold) == (1, 1)
    (public,) = ring.public_keys()
    assert (public.key_id, public.active) == (key_id, True)
    raw = base64.b64decode(public.public_key)
    assert len(raw) == 32
    assert hashlib.sha256(raw).hexdigest()[:16] == key_id
    assert ring.trusted() == {key_id: raw}


def test_open_again_keeps_the_key_and_tightens_the_directory(tmp_path: Path) -> None:
    # Prepare
    directory = tmp_path / "keys"
    first = KeyRing.open(directory).active_key_id
    directory.chmod(0o755)

    # Execute
    ring = KeyRing.open(directory)

    # Assert
    assert ring.active_key_id == first
    assert len(ring.public_keys()) == 1
    assert mode(directory) == 0o700


def test_a_key_that_others_can_read_is_refused_at_open(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    key_file = tmp_path / "keys" / f"{ring.active_key_id}.key"
    key_file.chmod(0o644)

    # Execute / Assert
    with pytest.raises(SigningError, match=r"open to others \(mode 0644\): chmod 600"):
        KeyRing.open(tmp_path / "keys")


def test_a_signed_desired_model_verifies_with_the_trusted_keys(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    issued_at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    # Execute
    document = ring.sign_desired(device_id="cam-a", manifest=manifest(), issued_at=issued_at)

    # Assert
    document.verify(ring.trusted())
    assert document.key_id == ring.active_key_id
    assert document.download_path == f"/api/v1/artifacts/{manifest().sha256}"
    assert document.issued_at == issued_at
    assert document.rollback_of is None
    assert len(base64.b64decode(document.signature)) == 64
    assert DesiredModel.from_bytes(document.to_json()) == document


def test_a_rollback_document_verifies(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")

    # Execute
    document = ring.sign_desired(device_id="cam-a", manifest=manifest(1), rollback_of="kitchen.v2")

    # Assert
    document.verify(ring.trusted())
    assert document.rollback_of == "kitchen.v2"


def test_a_wave_signed_together_verifies_document_by_document_as_a_device_reads_it(tmp_path: Path) -> None:
    # Prepare: two manifests among the devices, one of them a rollback
    ring = KeyRing.open(tmp_path / "keys")
    v1, v2 = manifest(1), manifest(2)
    wanted = [Desired(f"cam-{i}", v2) for i in range(5)] + [Desired("cam-back", v1, rollback_of=v2.model_id)]

    # Execute
    documents = ring.sign_desired_many(wanted)

    # Assert
    assert [(d.device_id, d.manifest, d.rollback_of) for d in documents] == [tuple(w) for w in wanted]
    for document in documents:
        assert verify_raw(document.to_json().encode(), ring.trusted()) == document
    assert len({d.signature for d in documents}) == len(documents)


def tampered(document: DesiredModel, field: str) -> DesiredModel:
    """`document` with one signed field (for the artifact: manifest and path) changed, old signature kept."""
    redirected = document.manifest.model_copy(update={"sha256": OTHER_SHA})
    changes: dict[str, dict[str, Any]] = {
        "device_id": {"device_id": "cam-b"},
        "manifest sha": {"manifest": redirected, "download_path": f"/api/v1/artifacts/{OTHER_SHA}"},
        "rollback_of": {"rollback_of": "kitchen.v1"},
        "issued_at": {"issued_at": document.issued_at + timedelta(seconds=1)},
    }
    return document.model_copy(update=changes[field])


@pytest.mark.parametrize("field", ["device_id", "manifest sha", "rollback_of", "issued_at"])
def test_tampering_with_any_field_breaks_the_signature(tmp_path: Path, field: str) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    document = ring.sign_desired(device_id="cam-a", manifest=manifest())

    # Execute
    forged = tampered(document, field)

    # Assert
    document.verify(ring.trusted())
    with pytest.raises(ContractError, match="does not verify"):
        forged.verify(ring.trusted())
    with pytest.raises(ContractError, match="does not verify"):
        verify_raw(forged.to_json().encode(), ring.trusted())


def test_a_document_of_another_key_ring_is_refused(tmp_path: Path) -> None:
    # Prepare
    ours = KeyRing.open(tmp_path / "ours")
    theirs = KeyRing.open(tmp_path / "theirs")

    # Execute
    document = theirs.sign_desired(device_id="cam-a", manifest=manifest())

    # Assert
    with pytest.raises(ContractError, match="unknown key_id"):
        document.verify(ours.trusted())


def test_rotation_keeps_old_documents_valid_until_the_old_key_is_retired(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    old_id = ring.active_key_id
    old_document = ring.sign_desired(device_id="cam-a", manifest=manifest())

    # Execute
    new_id = ring.rotate()
    new_document = ring.sign_desired(device_id="cam-a", manifest=manifest())
    both_trusted = ring.trusted()
    ring.retire(old_id)

    # Assert
    assert new_id != old_id and ring.active_key_id == new_id
    assert new_document.key_id == new_id
    assert set(both_trusted) == {old_id, new_id}
    old_document.verify(both_trusted)
    new_document.verify(both_trusted)
    assert [(k.key_id, k.active) for k in ring.public_keys()] == [(new_id, True)]
    assert not (tmp_path / "keys" / f"{old_id}.key").exists()
    new_document.verify(ring.trusted())
    with pytest.raises(ContractError, match="unknown key_id"):
        old_document.verify(ring.trusted())


def test_public_keys_mark_the_active_one_after_rotations(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    ids = [ring.active_key_id, ring.rotate(), ring.rotate()]

    # Execute
    keys = ring.public_keys()

    # Assert
    assert sorted(k.key_id for k in keys) == sorted(ids)
    assert [k.key_id for k in keys if k.active] == [ids[-1]]


def test_the_active_key_cannot_be_retired(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    key_id = ring.active_key_id

    # Execute / Assert
    with pytest.raises(SigningError, match="activate another first"):
        ring.retire(key_id)
    assert ring.trusted().keys() == {key_id}
    ring.sign_desired(device_id="cam-a", manifest=manifest()).verify(ring.trusted())


def test_retiring_an_unknown_key_is_an_error(tmp_path: Path) -> None:
    # Prepare: a typo must not look like success while the key to retire stays trusted
    ring = KeyRing.open(tmp_path / "keys")
    old_id = ring.active_key_id
    ring.rotate()
    typo = "0123456789abcdef"

    # Execute / Assert
    with pytest.raises(SigningError):
        ring.retire(typo)
    assert old_id in ring.trusted()


def test_retire_refuses_a_key_id_that_is_a_path(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    outside = [tmp_path / "precious.key", tmp_path / "precious.pub"]
    for path in outside:
        path.write_text("not the key ring's\n")

    # Execute / Assert
    with pytest.raises(SigningError):
        ring.retire("../precious")
    assert all(path.exists() for path in outside)


def test_a_key_file_that_does_not_hold_its_key_is_refused(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    key_path = tmp_path / "keys" / f"{ring.active_key_id}.key"
    key_path.chmod(0o600)
    key_path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    # Execute / Assert
    with pytest.raises(SigningError, match="does not hold key"):
        ring.sign_desired(device_id="cam-a", manifest=manifest())


def test_a_missing_or_garbled_active_file_is_a_signing_error(tmp_path: Path) -> None:
    # Prepare
    directory = tmp_path / "keys"
    ring = KeyRing.open(directory)
    (directory / "active").write_text("../../etc/passwd\n")

    # Execute / Assert
    with pytest.raises(SigningError, match="does not name a key"):
        ring.sign_desired(device_id="cam-a", manifest=manifest())
    (directory / "active").unlink()
    with pytest.raises(SigningError, match="no active signing key"):
        _ = ring.active_key_id


def test_private_keys_never_reach_the_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    caplog.set_level(logging.DEBUG)
    directory = tmp_path / "keys"

    # Execute
    ring = KeyRing.open(directory)
    ring.rotate()
    ring.rotate()
    ring.sign_desired(device_id="cam-a", manifest=manifest())

    # Assert
    spellings = private_secrets(directory)
    assert len(spellings) == 3 * 4
    logged = caplog.text + "".join(repr(record.args) for record in caplog.records)
    assert all(secret not in logged for secret in spellings)
    assert "PRIVATE KEY" not in logged
    assert ring.active_key_id in caplog.text  # the id is logged, so the logs are not simply empty
