"""KeyRing's key lifecycle and trust chain: stage, activate, rotate, revoke, retire; the chain each step
writes, and a device's TrustStore that follows it (also after being offline through rotations)."""

from __future__ import annotations

import base64
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from cloud.exceptions import SigningError
from cloud.signing import KeyRing
from device_firmware_py.trust import CLOCK_FLOOR, TrustStore
from tests.cloud.factories import make_manifest
from wire import ContractError, DesiredModel
from wire.common import utcnow
from wire.desired import verify_raw
from wire.errors import UnknownKeyError
from wire.manifest import ArtifactManifest
from wire.trust import MAX_CHAIN, TrustDocument, next_trust

BLOB = b"an int8 flatbuffer" * 50


def device_clock() -> datetime:
    """The device's clock: the real one (the ring dates its trust documents by it), set past the floor."""
    return max(utcnow(), CLOCK_FLOOR)


def manifest(version: int = 2) -> ArtifactManifest:
    """A valid manifest of the kitchen line."""
    return make_manifest(BLOB, line="kitchen", version=version)


def document_of(ring: KeyRing) -> bytes:
    """A desired model for cam-a signed by the ring's active key, as the device receives it."""
    return ring.sign_desired(device_id="cam-a", manifest=manifest()).to_json().encode()


def trust_files(directory: Path) -> list[str]:
    """The names of the trust documents written in the key directory."""
    return sorted(p.name for p in (directory / "trust").iterdir())


def chain(ring: KeyRing) -> bytes:
    """The ring's trust chain as published on the trust topic."""
    return ring.trust_chain().to_json().encode()


def device(ring: KeyRing, tmp_path: Path, name: str = "device") -> TrustStore:
    """A device provisioned now: the ring's current keys at the current trust version."""
    return TrustStore(
        ring.trusted(), tmp_path / f"{name}.json", root_version=ring.trust().version, now=device_clock
    )


def verifies(payload: bytes, trusted: TrustStore | dict[str, bytes]) -> DesiredModel:
    """The desired model, verified as the device's updater verifies it."""
    return verify_raw(payload, trusted)


# --- the first trust document ----------------------------------------------------------------------


def test_open_writes_trust_version_1_signed_by_the_first_key(tmp_path: Path) -> None:
    # Execute
    ring = KeyRing.open(tmp_path / "keys")

    # Assert
    first = ring.trust()
    assert (first.version, first.threshold, list(first.keys)) == (1, 1, [ring.active_key_id])
    assert first.signers(ring.trusted()) == {ring.active_key_id}
    assert ring.trust_chain().documents == [first]
    assert ring.staged() is None
    # a device given the key at version 0 (before any document) walks to version 1
    assert next_trust(ring.trusted(), 1, 0, ring.trust_chain(), device_clock()) == first


def test_a_key_directory_from_before_trust_documents_gets_version_1_of_all_its_keys(tmp_path: Path) -> None:
    # Prepare: two keys, the second active, and no trust directory (as a ring of an older release)
    directory = tmp_path / "keys"
    ring = KeyRing.open(directory)
    first, second = ring.active_key_id, ring.rotate()
    shutil.rmtree(directory / "trust")

    # Execute
    reopened = KeyRing.open(directory)

    # Assert
    assert trust_files(directory) == ["00000001.json"]
    assert reopened.active_key_id == second
    assert set(reopened.trusted()) == {first, second}
    latest = reopened.trust()
    assert (latest.version, latest.threshold) == (1, 2)
    assert latest.signers(reopened.trusted()) == {first, second}
    verifies(document_of(reopened), reopened.trusted())


def test_reopening_keeps_the_chain(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    ring.stage()
    chain_before = ring.trust_chain()

    # Execute
    reopened = KeyRing.open(tmp_path / "keys")

    # Assert
    assert reopened.trust_chain() == chain_before
    assert trust_files(tmp_path / "keys") == ["00000001.json", "00000002.json"]


# --- stage, activate, rotate -----------------------------------------------------------------------


def test_stage_trusts_a_new_key_without_making_it_sign(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    first = ring.active_key_id

    # Execute
    staged = ring.stage()

    # Assert
    assert staged != first and ring.active_key_id == first
    latest = ring.trust()
    assert (latest.version, latest.threshold, set(latest.keys)) == (2, 2, {first, staged})
    assert latest.signers(latest.raw_keys()) == {first, staged}
    assert ring.staged() == (staged, 2)
    assert [(k.key_id, k.active) for k in ring.public_keys()] == sorted([(first, True), (staged, False)])
    assert verifies(document_of(ring), ring.trusted()).key_id == first
    assert (tmp_path / "keys" / f"{staged}.key").is_file()


def test_activate_makes_a_staged_key_sign_without_a_new_trust_version(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    staged = ring.stage()

    # Execute
    ring.activate(staged)

    # Assert
    assert ring.active_key_id == staged
    assert ring.trust().version == 2
    assert ring.staged() is None
    assert verifies(document_of(ring), ring.trusted()).key_id == staged


def test_activate_refuses_a_key_that_is_not_trusted_or_not_held(tmp_path: Path) -> None:
    # Prepare: another ring's key copied in (held, never trusted), and a trusted key whose file is lost
    ring = KeyRing.open(tmp_path / "keys")
    first = ring.active_key_id
    stranger = KeyRing.open(tmp_path / "other").active_key_id
    for suffix in (".key", ".pub"):
        shutil.copy(tmp_path / "other" / f"{stranger}{suffix}", tmp_path / "keys" / f"{stranger}{suffix}")
    lost = ring.stage()
    (tmp_path / "keys" / f"{lost}.key").unlink()

    # Execute / Assert
    with pytest.raises(SigningError, match="no trusted key"):
        ring.activate(stranger)
    with pytest.raises(SigningError, match="no trusted key"):
        ring.activate("0123456789abcdef")
    with pytest.raises(SigningError, match="missing or unreadable"):
        ring.activate(lost)
    assert ring.active_key_id == first


def test_rotate_stages_and_activates_in_one_step(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    first = ring.active_key_id

    # Execute
    second = ring.rotate()

    # Assert
    assert ring.active_key_id == second != first
    assert (ring.trust().version, set(ring.trusted())) == (2, {first, second})
    assert ring.staged() is None


def test_staged_is_the_newest_trusted_key_added_after_the_active_one(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    first = ring.active_key_id

    # Execute
    b = ring.stage()
    c = ring.stage()
    two_waiting = ring.staged()
    ring.activate(b)
    one_waiting = ring.staged()
    ring.activate(c)
    none_waiting = ring.staged()
    ring.activate(first)  # back to the oldest: both later keys wait again
    back_to_first = ring.staged()

    # Assert
    assert two_waiting == (c, 3)
    assert one_waiting == (c, 3)
    assert none_waiting is None
    assert back_to_first == (c, 3)


# --- revoke and retire -----------------------------------------------------------------------------


def test_revoke_removes_a_key_from_the_trust_set_and_the_disk(tmp_path: Path) -> None:
    # Prepare
    directory = tmp_path / "keys"
    ring = KeyRing.open(directory)
    first = ring.active_key_id
    second = ring.stage()
    third = ring.stage()

    # Execute
    ring.revoke(second)

    # Assert
    latest = ring.trust()
    assert (latest.version, latest.threshold, set(latest.keys)) == (4, 2, {first, third})
    assert second not in ring.trusted() and ring.active_key_id == first
    assert not (directory / f"{second}.key").exists() and not (directory / f"{second}.pub").exists()
    # the keys of version 3 (the revoked one among them) agreed to version 4
    assert latest.signers(ring.trust_chain().documents[-2].raw_keys()) == {first, second, third}
    assert ring.staged() == (third, 3)


def test_revoking_the_active_key_hands_signing_to_the_newest_other_held_trusted_key(tmp_path: Path) -> None:
    # Prepare: keys a (active), b, c, d; d's private key is not on this machine
    directory = tmp_path / "keys"
    ring = KeyRing.open(directory)
    a = ring.active_key_id
    b, c, d = ring.stage(), ring.stage(), ring.stage()
    (directory / f"{d}.key").unlink()
    signed_by_a = document_of(ring)

    # Execute
    ring.revoke(a)

    # Assert
    assert ring.active_key_id == c
    assert set(ring.trusted()) == {b, c, d}
    assert verifies(document_of(ring), ring.trusted()).key_id == c
    with pytest.raises(UnknownKeyError, match=f"unknown key_id {a}"):
        verifies(signed_by_a, ring.trusted())
    assert not (directory / f"{a}.key").exists()


def test_the_only_key_cannot_be_revoked(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    only = ring.active_key_id

    # Execute / Assert
    with pytest.raises(SigningError, match="the only trusted key cannot be revoked"):
        ring.revoke(only)
    assert (ring.trust().version, ring.active_key_id) == (1, only)
    assert (tmp_path / "keys" / f"{only}.key").is_file()


@pytest.mark.parametrize("key_id", ["0123456789abcdef", "../keys/active", "", "A" * 16])
def test_revoking_a_key_that_is_not_trusted_is_refused(tmp_path: Path, key_id: str) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    ring.stage()

    # Execute / Assert
    with pytest.raises(SigningError, match="no trusted key"):
        ring.revoke(key_id)
    assert ring.trust().version == 2


def test_retire_revokes_a_key_that_no_longer_signs(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    first = ring.active_key_id
    second = ring.rotate()

    # Execute
    ring.retire(first)

    # Assert
    assert (ring.trust().version, set(ring.trusted()), ring.trust().threshold) == (3, {second}, 1)
    with pytest.raises(SigningError, match="activate another first"):
        ring.retire(second)


# --- what the chain says -------------------------------------------------------------------------


def test_public_keys_and_trusted_follow_the_latest_trust_document_not_the_files(tmp_path: Path) -> None:
    # Prepare: a stray key pair in the directory that no trust document lists
    directory = tmp_path / "keys"
    ring = KeyRing.open(directory)
    second = ring.stage()
    stray = KeyRing.open(tmp_path / "other").active_key_id
    for suffix in (".key", ".pub"):
        shutil.copy(tmp_path / "other" / f"{stray}{suffix}", directory / f"{stray}{suffix}")

    # Execute
    public = ring.public_keys()
    trusted = ring.trusted()

    # Assert
    assert (
        {k.key_id for k in public} == set(trusted) == set(ring.trust().keys) == {ring.active_key_id, second}
    )
    assert all(base64.b64decode(k.public_key) == trusted[k.key_id] for k in public)


def test_the_chain_holds_the_latest_documents_only(tmp_path: Path) -> None:
    # Prepare: 21 trust versions (a key staged, then the previous one retired, ten times)
    ring = KeyRing.open(tmp_path / "keys")
    for _ in range(10):
        old = ring.active_key_id
        ring.rotate()
        ring.retire(old)

    # Execute
    published = ring.trust_chain()

    # Assert
    versions = [d.version for d in published.documents]
    assert versions == list(range(21 - MAX_CHAIN + 1, 22))
    assert published.latest == ring.trust()
    assert len(trust_files(tmp_path / "keys")) == 21


def test_the_chain_walks_from_its_first_document_to_its_latest(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    first = ring.trust()
    ring.stage()
    ring.rotate()
    ring.retire(next(iter(first.keys)))

    # Execute
    reached = next_trust(first.raw_keys(), first.threshold, 1, ring.trust_chain(), device_clock())

    # Assert
    assert reached == ring.trust()


# --- the held keys must meet the thresholds --------------------------------------------------------


def two_keys_one_lost(tmp_path: Path) -> tuple[KeyRing, str, str]:
    """A ring trusting two keys (both must sign the next version) whose second private key is gone."""
    ring = KeyRing.open(tmp_path / "keys")
    first, lost = ring.active_key_id, ring.stage()
    (tmp_path / "keys" / f"{lost}.key").unlink()
    return ring, first, lost


def test_with_a_private_key_lost_stage_is_refused_and_the_trust_set_stays(tmp_path: Path) -> None:
    # Prepare
    ring, first, lost = two_keys_one_lost(tmp_path)
    before = ring.trust()

    # Execute / Assert
    with pytest.raises(SigningError, match="cannot sign for 2 of the trusted keys"):
        ring.stage()
    assert ring.trust() == before and len(trust_files(tmp_path / "keys")) == 2
    assert ring.active_key_id == first


@pytest.mark.parametrize(
    ("which", "reason"),
    [("lost", "cannot sign for 2 of the trusted keys"), ("active", "no other trusted key is held here")],
)
def test_with_a_private_key_lost_revoke_is_refused_and_the_trust_set_stays(
    tmp_path: Path, which: str, reason: str
) -> None:
    # Prepare
    ring, first, lost = two_keys_one_lost(tmp_path)
    before = ring.trust()

    # Execute / Assert
    with pytest.raises(SigningError, match=reason):
        ring.revoke(lost if which == "lost" else first)
    assert ring.trust() == before
    assert ring.active_key_id == first
    assert (tmp_path / "keys" / f"{first}.key").is_file()


def test_a_refused_stage_leaves_no_key_behind(tmp_path: Path) -> None:
    # Prepare
    ring, first, lost = two_keys_one_lost(tmp_path)
    files = sorted(p.name for p in (tmp_path / "keys").iterdir())

    # Execute
    with pytest.raises(SigningError):
        ring.stage()

    # Assert
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == files


def test_a_refused_revoke_of_the_active_key_leaves_the_active_key(tmp_path: Path) -> None:
    # Prepare: a (active), b, c trusted; c's private key is lost, so {b, c} cannot sign for themselves
    directory = tmp_path / "keys"
    ring = KeyRing.open(directory)
    a = ring.active_key_id
    ring.stage()
    c = ring.stage()
    (directory / f"{c}.key").unlink()

    # Execute
    with pytest.raises(SigningError, match="cannot sign for 2 of the new keys"):
        ring.revoke(a)

    # Assert: a is still trusted, so it should still be the one that signs
    assert a in ring.trusted()
    assert ring.active_key_id == a


# --- a device follows the chain ---------------------------------------------------------------------


def test_a_device_follows_the_chain_through_stage_activate_and_revoke(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    store = device(ring, tmp_path)
    old = ring.active_key_id
    signed_by_old = document_of(ring)

    # Execute / Assert: stage; the device learns the new key before it signs anything
    new = ring.stage()
    assert store.apply(chain(ring)) == ring.trust()
    assert set(store) == {old, new} and store.version == 2

    # activate: no new trust version; what the new key signs verifies on the device
    ring.activate(new)
    assert store.apply(chain(ring)) is None
    assert verifies(document_of(ring), store).key_id == new
    assert verifies(signed_by_old, store).key_id == old

    # revoke: the device drops the old key, and refuses what it signed
    ring.revoke(old)
    reached = store.apply(chain(ring))
    assert reached is not None and reached.version == 3 == store.version
    assert set(store) == {new}
    with pytest.raises(UnknownKeyError, match=f"unknown key_id {old}"):
        verifies(signed_by_old, store)
    assert verifies(document_of(ring), store).key_id == new


def test_a_device_offline_through_two_rotations_catches_up_in_one_apply(tmp_path: Path) -> None:
    # Prepare: provisioned at version 1; then two rotations, each old key retired (versions 2 to 5)
    ring = KeyRing.open(tmp_path / "keys")
    store = device(ring, tmp_path)
    first = ring.active_key_id
    for _ in range(2):
        old = ring.active_key_id
        ring.rotate()
        ring.retire(old)
    assert ring.trust().version == 5

    # Execute
    reached = store.apply(chain(ring))

    # Assert
    assert reached == ring.trust()
    assert dict(store) == ring.trusted() and first not in store
    assert verifies(document_of(ring), store).key_id == ring.active_key_id
    restarted = TrustStore(
        {first: base64.b64decode(ring.trust_chain().documents[0].keys[first])},
        tmp_path / "device.json",
        root_version=1,
        now=device_clock,
    )
    assert (restarted.version, dict(restarted)) == (5, ring.trusted())


def test_a_device_further_behind_than_the_chain_must_be_provisioned_again(tmp_path: Path) -> None:
    # Prepare: the device holds version 1; the ring went on to a version whose chain starts after 2
    ring = KeyRing.open(tmp_path / "keys")
    store = device(ring, tmp_path)
    for _ in range(MAX_CHAIN // 2 + 1):
        old = ring.active_key_id
        ring.rotate()
        ring.retire(old)
    assert ring.trust_chain().documents[0].version > 2

    # Execute / Assert
    with pytest.raises(ContractError, match="provision it again"):
        store.apply(chain(ring))
    assert store.version == 1


def test_a_device_provisioned_after_a_rotation_starts_from_that_version(tmp_path: Path) -> None:
    # Prepare
    ring = KeyRing.open(tmp_path / "keys")
    ring.rotate()
    store = device(ring, tmp_path)

    # Execute / Assert: the retained chain holds nothing newer for it; the next version it takes
    assert (store.version, store.apply(chain(ring))) == (2, None)
    ring.retire(next(k for k in ring.trusted() if k != ring.active_key_id))
    reached = store.apply(chain(ring))
    assert isinstance(reached, TrustDocument) and reached.version == 3
