"""device_firmware_py.trust: the device's TrustStore follows the cloud's trust chain, keeps what it
reached across restarts, never goes back, waits for a set clock; the Updater verifies with it live."""

from __future__ import annotations

import base64
import json
import logging
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cloud.signing import KeyRing
from device_firmware_py.ota import ModelSlots, Updater
from device_firmware_py.trust import CLOCK_FLOOR, TrustStore, clock_is_set
from tests.device.artifacts import DEVICE, T0, ArtifactServer, signed
from tests.device.ota_devices import assert_refused, server_fetch
from wire import AckResult, ContractError
from wire.desired import verify_raw
from wire.trust import KeySignature, TrustChain, TrustDocument

if TYPE_CHECKING:
    from cloud.ml.export import EdgeArtifact
    from cloud.ml.line import EdgeLine

CLOCK = T0 + timedelta(days=1)  # the device's clock: set, and after every document of these tests


@pytest.fixture
def keys(tmp_path: Path) -> KeyRing:
    """A fresh cloud key ring (trust version 1, one key) that the test may rotate."""
    return KeyRing.open(tmp_path / "keys")


def chain(ring: KeyRing) -> bytes:
    """The ring's trust chain as the device receives it on the trust topic."""
    return ring.trust_chain().to_json().encode()


def device_store(ring: KeyRing, state_file: Path, now: Callable[[], datetime] = lambda: CLOCK) -> TrustStore:
    """A device provisioned with `ring`'s current keys and trust version."""
    return TrustStore(ring.trusted(), state_file, root_version=ring.trust().version, now=now)


def mode(path: Path) -> int:
    """The permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_store_trusts_the_configured_keys_at_their_version(keys: KeyRing, tmp_path: Path) -> None:
    # Prepare
    root = keys.trusted()

    # Execute
    store = TrustStore(root, tmp_path / "trust.json", root_version=7)

    # Assert
    assert dict(store) == root
    assert (len(store), list(store), keys.active_key_id in store) == (1, list(root), True)
    assert store[keys.active_key_id] == root[keys.active_key_id]
    assert (store.version, store.threshold) == (7, 1)
    assert not (tmp_path / "trust.json").exists()


def test_applying_the_chain_reaches_its_latest_version_and_keeps_it_owner_only(
    keys: KeyRing, tmp_path: Path
) -> None:
    # Prepare: the device knows v1; the cloud then staged a key and rotated to another (v3)
    store = device_store(keys, tmp_path / "trust.json")
    keys.stage()
    keys.rotate()

    # Execute
    reached = store.apply(chain(keys))

    # Assert
    assert reached == keys.trust()
    assert dict(store) == keys.trusted() and len(store) == 3
    assert (store.version, store.threshold) == (3, 2)
    assert TrustDocument.model_validate_json((tmp_path / "trust.json").read_bytes()) == reached
    assert mode(tmp_path / "trust.json") == 0o600


def test_a_restarted_store_resumes_from_the_version_it_reached(keys: KeyRing, tmp_path: Path) -> None:
    # Prepare: the configuration still names v1's key; the store reached v2 before the restart
    root = keys.trusted()
    store = TrustStore(root, tmp_path / "trust.json", root_version=1, now=lambda: CLOCK)
    keys.stage()
    store.apply(chain(keys))

    # Execute
    restarted = TrustStore(root, tmp_path / "trust.json", root_version=1, now=lambda: CLOCK)

    # Assert
    assert dict(restarted) == keys.trusted() != root
    assert (restarted.version, restarted.threshold) == (2, 2)


def test_an_older_chain_never_takes_the_store_back(keys: KeyRing, tmp_path: Path) -> None:
    # Prepare: the device reached v3, where the first key is revoked; v2's chain is replayed to it
    first = keys.active_key_id
    store = device_store(keys, tmp_path / "trust.json")
    keys.rotate()
    old_chain = chain(keys)
    keys.revoke(first)
    store.apply(chain(keys))
    saved = (tmp_path / "trust.json").read_bytes()

    # Execute
    reached = store.apply(old_chain)

    # Assert
    assert reached is None
    assert store.version == 3 and first not in store
    assert (tmp_path / "trust.json").read_bytes() == saved
    assert store.apply(chain(keys)) is None  # the same chain again is nothing new either


def test_a_saved_version_no_newer_than_the_configured_one_is_ignored(keys: KeyRing, tmp_path: Path) -> None:
    # Prepare: the device saved v2, then was provisioned again with v3's keys
    store = device_store(keys, tmp_path / "trust.json")
    first = keys.active_key_id
    keys.rotate()
    store.apply(chain(keys))
    keys.retire(first)

    # Execute
    reprovisioned = device_store(keys, tmp_path / "trust.json")

    # Assert
    assert reprovisioned.version == 3
    assert dict(reprovisioned) == keys.trusted() and first not in reprovisioned


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\xff garbage",
        b"[]",
        b'{"schema": "diredi.trust/1"}',
        b'{"version": 2, "version": 9}',
        b'{"threshold": NaN}',
    ],
    ids=["empty", "binary", "array", "incomplete", "duplicate-key", "nan"],
)
def test_a_corrupt_state_file_falls_back_to_the_configured_keys_with_an_error(
    keys: KeyRing, tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    # Prepare
    state = tmp_path / "trust.json"
    state.write_bytes(content)
    state.chmod(0o644)

    # Execute
    with caplog.at_level(logging.ERROR, logger="device_firmware_py.trust"):
        store = device_store(keys, state)

    # Assert
    assert dict(store) == keys.trusted() and store.version == 1
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert str(state) in caplog.text and "starting from the configured keys" in caplog.text
    keys.stage()
    assert store.apply(chain(keys)) == keys.trust()  # and the chain mends it
    assert mode(state) == 0o600


def test_a_forged_state_file_listing_a_key_under_another_id_is_not_adopted(
    keys: KeyRing, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a valid-looking v9 whose only key_id is not the id of the key it lists
    document = json.loads(keys.trust().model_dump_json(by_alias=True))
    document["version"] = 9
    document["keys"] = {"0123456789abcdef": next(iter(document["keys"].values()))}
    (tmp_path / "trust.json").write_text(json.dumps(document))

    # Execute
    with caplog.at_level(logging.ERROR, logger="device_firmware_py.trust"):
        store = device_store(keys, tmp_path / "trust.json")

    # Assert
    assert (dict(store), store.version) == (keys.trusted(), 1)
    assert "unreadable" in caplog.text


def test_a_chain_waits_while_the_clock_is_not_set(keys: KeyRing, tmp_path: Path) -> None:
    # Prepare: a Raspberry Pi before NTP: its clock reads a moment before the floor
    clock = [CLOCK_FLOOR - timedelta(seconds=1)]
    store = device_store(keys, tmp_path / "trust.json", now=lambda: clock[0])
    root = keys.trusted()
    keys.stage()

    # Execute
    with pytest.raises(ContractError, match=r"the clock \(.*\) is not set yet"):
        store.apply(chain(keys))
    unchanged = (store.version, dict(store), (tmp_path / "trust.json").exists())
    clock[0] = CLOCK
    reached = store.apply(chain(keys))

    # Assert
    assert unchanged == (1, root, False)
    assert reached is not None and reached.version == 2 == store.version


@pytest.mark.parametrize(
    ("now", "is_set"),
    [
        (CLOCK_FLOOR, True),
        (CLOCK_FLOOR + timedelta(days=400), True),
        (CLOCK_FLOOR - timedelta(microseconds=1), False),
        (datetime(1970, 1, 1, tzinfo=UTC), False),
    ],
)
def test_the_clock_is_set_from_the_floor_on(now: datetime, is_set: bool) -> None:
    # Execute / Assert
    assert clock_is_set(now) is is_set


def test_a_chain_signed_by_keys_the_device_does_not_hold_changes_nothing(
    keys: KeyRing, tmp_path: Path
) -> None:
    # Prepare: another cloud (or an attacker with its own key ring) publishes a chain of its own
    store = device_store(keys, tmp_path / "trust.json")
    rogue = KeyRing.open(tmp_path / "rogue")
    rogue.stage()
    rogue.stage()

    # Execute / Assert
    with pytest.raises(ContractError, match="valid signatures by the keys of version 1"):
        store.apply(chain(rogue))
    assert (store.version, dict(store)) == (1, keys.trusted())
    assert not (tmp_path / "trust.json").exists()


def test_a_step_that_does_not_verify_leaves_the_store_where_it_was(keys: KeyRing, tmp_path: Path) -> None:
    # Prepare: v2 is sound; v3's signatures were stripped on the way
    store = device_store(keys, tmp_path / "trust.json")
    keys.stage()
    keys.stage()
    received = json.loads(chain(keys))
    received["documents"][-1]["signatures"] = []

    # Execute / Assert
    with pytest.raises(ContractError, match="trust document 3 has 0 valid signatures"):
        store.apply(json.dumps(received).encode())
    assert store.version == 1 and len(store) == 1
    assert not (tmp_path / "trust.json").exists()


@pytest.mark.parametrize(
    "payload", [b"", b"{}", b"\xff", b'{"schema": "diredi.trust-chain/1", "documents": []}']
)
def test_garbage_on_the_trust_topic_is_a_contract_error_and_changes_nothing(
    keys: KeyRing, tmp_path: Path, payload: bytes
) -> None:
    # Prepare
    store = device_store(keys, tmp_path / "trust.json")

    # Execute / Assert
    with pytest.raises(ContractError):
        store.apply(payload)
    assert (store.version, dict(store)) == (1, keys.trusted())


# --- the updater verifies with the store (real int8 models, served over HTTP) ------------------------


def ota_device(tmp_path: Path, ring: KeyRing, server: ArtifactServer) -> tuple[TrustStore, Updater]:
    """A device provisioned with `ring`'s keys, whose updater verifies with its TrustStore."""
    (tmp_path / "state").mkdir()
    store = device_store(ring, tmp_path / "state" / "trust.json")
    updater = Updater(
        DEVICE,
        store,
        ModelSlots(tmp_path / "models"),
        server_fetch(server),
        tmp_path / "state" / "ota.json",
        now=lambda: CLOCK,
    )
    return store, updater


@pytest.mark.slow
def test_after_a_trust_update_a_document_signed_by_the_new_key_installs(
    tmp_path: Path,
    keys: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
) -> None:
    # Prepare: the device runs v1; the cloud rotates before the device learned the new key
    store, updater = ota_device(tmp_path, keys, artifact_server)
    artifact_server.offer(base_line.artifact)
    artifact_server.offer(v2)
    assert updater.apply(signed(keys, base_line.artifact.manifest, 0)).result is AckResult.installed
    new = keys.rotate()
    document = signed(keys, v2.manifest, 1)

    # Execute
    before = updater.apply(document)
    store.apply(chain(keys))
    after = updater.apply(document)

    # Assert
    assert_refused(before, f"signed with unknown key_id {new}")
    assert before.retry is True  # a trust update may bring the key: the daemon applies it again
    assert (after.result, after.running_model_id, after.retry) == (AckResult.installed, "base.v2", False)
    assert new in store


@pytest.mark.slow
def test_after_a_revocation_a_document_signed_by_the_revoked_key_is_refused(
    tmp_path: Path,
    keys: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
) -> None:
    # Prepare: the device runs v1 and trusts both keys; the old one signs a document, then is revoked
    store, updater = ota_device(tmp_path, keys, artifact_server)
    artifact_server.offer(base_line.artifact)
    artifact_server.offer(v2)
    assert updater.apply(signed(keys, base_line.artifact.manifest, 0)).result is AckResult.installed
    old = keys.active_key_id
    new = keys.stage()
    store.apply(chain(keys))
    stolen = signed(keys, v2.manifest, 1)
    verify_raw(stolen, store)  # good until the revocation reaches the device
    keys.activate(new)
    keys.revoke(old)
    requests = len(artifact_server.requests)

    # Execute
    store.apply(chain(keys))
    refused = updater.apply(stolen)
    fresh = updater.apply(signed(keys, v2.manifest, 2))

    # Assert
    assert_refused(refused, f"signed with unknown key_id {old}")
    assert refused.retry is True
    assert fresh.result is AckResult.installed and fresh.running_model_id == "base.v2"
    assert artifact_server.requests[requests:] == [f"/api/v1/artifacts/{v2.manifest.sha256}"]
    assert (store.version, set(store)) == (3, {new})


def test_a_device_provisioned_at_a_two_key_version_needs_two_signatures_to_move(
    keys: KeyRing, tmp_path: Path
) -> None:
    # Prepare: provisioned at version 2 (two keys, threshold 2), as the API returns it
    keys.stage()
    trust = keys.trust()
    store = TrustStore(
        keys.trusted(),
        tmp_path / "trust.json",
        root_version=trust.version,
        root_threshold=trust.threshold,
        now=lambda: CLOCK,
    )
    a = keys.active_key_id
    forged = TrustDocument(version=3, keys={a: trust.keys[a]}, threshold=1, issued_at=T0)
    message = forged.signed_bytes()
    signature = base64.b64encode(keys._private(a).sign(message)).decode()  # one stolen key signs alone
    forged = forged.model_copy(update={"signatures": [KeySignature(key_id=a, signature=signature)]})
    payload = TrustChain(documents=[*keys.trust_chain().documents, forged]).to_json().encode()

    # Execute / Assert
    assert trust.threshold == 2
    with pytest.raises(ContractError, match="1 valid signatures by the keys of version 2, 2 needed"):
        store.apply(payload)
    assert (store.version, set(store)) == (2, set(trust.keys))
