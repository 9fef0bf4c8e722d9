"""device_firmware_py.ota.Updater on real int8 models and documents signed by the cloud's KeyRing: it
installs newer versions and signed rollbacks, and after every refusal the old model serves."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from cloud.signing import KeyRing
from device_firmware_py.config import Identity
from device_firmware_py.download import http_fetcher
from device_firmware_py.exceptions import DownloadCancelled
from device_firmware_py.ota import UpdateOutcome
from tests.device.artifacts import DEVICE, MAX_BYTES, SECRET, T0, ArtifactServer, signed
from tests.device.ota_devices import (
    assert_refused,
    assert_serves,
    device_on_v1,
    make_device,
    mode,
    server_fetch,
)
from wire import AckResult, ArtifactManifest, EncodedArray

if TYPE_CHECKING:
    from cloud.ml.data import ScenarioData
    from cloud.ml.export import EdgeArtifact
    from cloud.ml.line import EdgeLine


@pytest.fixture
def x(small_data: ScenarioData) -> np.ndarray[Any, Any]:
    """A few validation inputs to compare predictions on."""
    return small_data.val.x[:16]


def test_updater_installs_a_newer_version(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
    x: Any,
) -> None:
    # Prepare
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    artifact_server.offer(v2)

    # Execute
    outcome = device.updater.apply(signed(ring, v2.manifest, 1))

    # Assert
    assert (outcome.result, outcome.reason, outcome.model_id, outcome.running_model_id) == (
        AckResult.installed,
        "",
        "base.v2",
        "base.v2",
    )
    assert outcome.model is not None and outcome.model.manifest == v2.manifest
    assert_serves(device, v2, x)
    assert mode(device.root / "state" / "ota.json") == 0o600


def test_a_document_for_the_running_model_is_a_no_op(
    tmp_path: Path, ring: KeyRing, artifact_server: ArtifactServer, base_line: EdgeLine
) -> None:
    # Prepare: the retained document arrives again at every reconnect
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    requests = len(artifact_server.requests)

    # Execute
    outcome = device.updater.apply(signed(ring, base_line.artifact.manifest, 0))

    # Assert
    assert outcome == UpdateOutcome(None, "", "base.v1", "base.v1")
    assert len(artifact_server.requests) == requests  # nothing downloaded


def forged_signature(ring: KeyRing, manifest: ArtifactManifest) -> bytes:
    """A document whose issued_at was moved after signing (to beat the replay check)."""
    document = json.loads(signed(ring, manifest, 1))
    document["issued_at"] = (T0 + timedelta(days=365)).isoformat()
    return json.dumps(document).encode()


def other_key(tmp_path: Path, manifest: ArtifactManifest) -> bytes:
    """A well-formed document signed by a key the device does not trust."""
    return signed(KeyRing.open(tmp_path / "rogue-keys"), manifest, 1)


def wrong_device(ring: KeyRing, manifest: ArtifactManifest) -> bytes:
    """A valid document for another device."""
    return signed(ring, manifest, 1, device_id="cam-02")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda ring, tmp, m: forged_signature(ring, m), "signature does not verify"),
        (lambda ring, tmp, m: other_key(tmp, m), "signed with unknown key_id"),
        (lambda ring, tmp, m: wrong_device(ring, m), f"document is for device cam-02, not {DEVICE}"),
    ],
    ids=["wrong-signature", "unknown-key", "other-device"],
)
def test_documents_that_do_not_verify_are_refused(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
    x: Any,
    make: Callable[[KeyRing, Path, ArtifactManifest], bytes],
    reason: str,
) -> None:
    # Prepare
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    artifact_server.offer(v2)

    # Execute
    outcome = device.updater.apply(make(ring, tmp_path, v2.manifest))

    # Assert
    assert_refused(outcome, reason)
    assert_serves(device, base_line.artifact, x)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("corrupt", "sha256 mismatch: got"),
        ("truncate", "download failed: truncated"),
        ("short", "download failed: truncated"),
        ("no_length", "download failed: oversized"),
        ("missing", "download failed: HTTP 404"),
    ],
)
def test_bad_artifacts_from_the_server_are_refused(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
    x: Any,
    mode: str,
    reason: str,
) -> None:
    # Prepare
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    flipped = bytearray(v2.model)
    flipped[len(flipped) // 2] ^= 0xFF
    bodies = {"corrupt": bytes(flipped), "short": v2.model[:-1], "no_length": v2.model + b"extra"}
    if mode != "missing":
        artifact_server.offer(
            v2, bodies.get(mode, v2.model), "ok" if mode in bodies and mode != "no_length" else mode
        )

    # Execute
    outcome = device.updater.apply(signed(ring, v2.manifest, 1))

    # Assert
    assert_refused(outcome, reason)
    assert outcome.model_id == "base.v2"
    assert_serves(device, base_line.artifact, x)


@pytest.mark.parametrize(("cut", "reason"), [(-1, "size mismatch: got"), (1, "size mismatch: got")])
def test_the_updater_checks_size_itself(
    tmp_path: Path, ring: KeyRing, base_line: EdgeLine, v2: EdgeArtifact, x: Any, cut: int, reason: str
) -> None:
    # Prepare: a fetch that does not check what it returns
    v1 = base_line.artifact
    store = {v1.manifest.sha256: v1.model, v2.manifest.sha256: v2.model[:-1] if cut < 0 else v2.model + b"\0"}
    device = make_device(tmp_path, ring, lambda d: store[d.manifest.sha256])
    assert device.updater.apply(signed(ring, v1.manifest, 0)).result is AckResult.installed

    # Execute
    outcome = device.updater.apply(signed(ring, v2.manifest, 1))

    # Assert
    assert_refused(outcome, reason)
    assert_serves(device, v1, x)


def test_an_older_version_needs_a_signed_rollback(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
    x: Any,
) -> None:
    # Prepare: the device runs v2
    v1 = base_line.artifact
    device = device_on_v1(tmp_path, ring, artifact_server, v1)
    artifact_server.offer(v2)
    assert device.updater.apply(signed(ring, v2.manifest, 1)).result is AckResult.installed

    # Execute
    downgrade = device.updater.apply(signed(ring, v1.manifest, 2))
    rollback = device.updater.apply(signed(ring, v1.manifest, 3, rollback_of="base.v2"))

    # Assert
    assert_refused(downgrade, "version 1 is not newer than the running base.v2", running="base.v2")
    assert (rollback.result, rollback.running_model_id) == (AckResult.installed, "base.v1")
    assert_serves(device, v1, x)


def test_a_replayed_older_document_is_refused_across_restarts(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
    x: Any,
) -> None:
    # Prepare: an old signed rollback to v1 was captured; the device has since accepted v2
    v1 = base_line.artifact
    old_rollback = signed(ring, v1.manifest, 1, rollback_of="base.v2")
    device = device_on_v1(tmp_path, ring, artifact_server, v1)
    artifact_server.offer(v2)
    assert device.updater.apply(signed(ring, v2.manifest, 5)).result is AckResult.installed
    restarted = make_device(tmp_path, ring, server_fetch(artifact_server))

    # Execute
    outcome = restarted.updater.apply(old_rollback)

    # Assert
    assert_refused(
        outcome, "replayed document: issued_at 2030-01-01T00:01:00+00:00 is older", running="base.v2"
    )
    assert_serves(device, v2, x)


def altered_probes(manifest: ArtifactManifest) -> ArtifactManifest:
    """The manifest with probe 0's expected logits moved by 5 int8 steps."""
    probe = manifest.probes[0]
    logits = np.clip(probe.logits.to_numpy().astype(np.int16) + 5, -128, 127)
    moved = probe.model_copy(update={"logits": EncodedArray.from_numpy(logits, "int8")})
    return manifest.model_copy(update={"probes": [moved, *manifest.probes[1:]]})


def test_a_model_failing_its_self_test_is_never_switched_to(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
    x: Any,
) -> None:
    # Prepare: the cloud signed a manifest whose probe outputs the artifact does not produce
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    artifact_server.offer(v2)

    # Execute
    outcome = device.updater.apply(signed(ring, altered_probes(v2.manifest), 1))

    # Assert
    assert_refused(outcome, "self-test before the swap failed: self-test failed: probe 0 logits differs by")
    assert_serves(device, base_line.artifact, x)


def test_a_failed_self_test_after_the_swap_rolls_back(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
    x: Any,
) -> None:
    # Prepare: the new slot's file goes bad between the swap and the reload, as a failing disk would
    def corrupt(model_path: Path) -> None:
        model_path.write_bytes(b"\0" * model_path.stat().st_size)

    device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    artifact_server.offer(v2)
    device = make_device(tmp_path, ring, server_fetch(artifact_server), on_switched=corrupt)

    # Execute
    outcome = device.updater.apply(signed(ring, v2.manifest, 1))

    # Assert
    assert outcome.result is AckResult.rolled_back
    assert "self-test after the swap failed: artifact does not match its manifest" in outcome.reason
    assert "rolled back to base.v1" in outcome.reason
    assert (outcome.model_id, outcome.running_model_id) == ("base.v2", "base.v1")
    assert_serves(device, base_line.artifact, x)


def test_a_cancelled_download_propagates_and_keeps_the_old_model(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
    x: Any,
) -> None:
    # Prepare
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    artifact_server.offer(v2, mode="slow")
    cancelled = threading.Event()
    device.updater.fetch = http_fetcher(
        artifact_server.url,
        device_id=DEVICE,
        identity=Identity(secret=SECRET),
        max_bytes=MAX_BYTES,
        ca_file=None,
        timeout=10.0,
        cancelled=cancelled,
    )
    threading.Timer(0.3, cancelled.set).start()

    # Execute / Assert
    with pytest.raises(DownloadCancelled):
        device.updater.apply(signed(ring, v2.manifest, 1))
    assert_serves(device, base_line.artifact, x)


GARBAGE = {
    "not-json": b"this is not json",
    "not-utf8": b"\xff\xfe\x00garbage",
    "empty": b"",
    "array": b"[1, 2, 3]",
    "empty-object": b"{}",
    "wrong-types": json.dumps({"device_id": 5, "manifest": "x", "issued_at": [], "key_id": None}).encode(),
    "huge": b'{"pad": "' + b"x" * 100_000 + b'"}',
    "deep": b"[" * 10_000 + b"]" * 10_000,
}


@pytest.mark.parametrize("payload", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_payloads_fail_with_a_reason(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    x: Any,
    payload: bytes,
) -> None:
    # Prepare
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)

    # Execute
    outcome = device.updater.apply(payload)

    # Assert
    assert_refused(outcome, "")
    assert outcome.reason and outcome.model_id is None
    assert_serves(device, base_line.artifact, x)


def test_a_mistyped_field_in_a_signed_shape_names_the_field(
    tmp_path: Path, ring: KeyRing, artifact_server: ArtifactServer, base_line: EdgeLine, v2: EdgeArtifact
) -> None:
    # Prepare
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    document = json.loads(signed(ring, v2.manifest, 1))
    document["manifest"]["version"] = "two"

    # Execute
    outcome = device.updater.apply(json.dumps(document).encode())

    # Assert
    assert_refused(outcome, "rejected document: invalid desired model at manifest.version")


def test_load_active_falls_back_to_the_other_slot(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
    x: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: v2 active in slot b, v1 in slot a; then slot b's file is damaged on disk
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    artifact_server.offer(v2)
    assert device.updater.apply(signed(ring, v2.manifest, 1)).result is AckResult.installed
    (device.slots.root / "b" / "model.tflite").write_bytes(b"garbage")
    # (the level is set here: other tests in the same session may have raised the loggers' levels)
    caplog.set_level(logging.WARNING, logger="device_firmware_py.ota")

    # Execute
    model = device.updater.load_active()

    # Assert
    assert model is not None and model.manifest.model_id == "base.v1"
    assert "serving base.v1 from slot a: the active slot is broken" in caplog.text
    assert device.slots.active_name() == "a"
    assert_serves(device, base_line.artifact, x)


def test_load_active_with_nothing_installed_is_none(tmp_path: Path, ring: KeyRing) -> None:
    # Prepare
    device = make_device(tmp_path, ring, lambda d: b"")

    # Execute / Assert
    assert device.updater.load_active() is None


def test_the_first_install_rolled_back_leaves_no_model(
    tmp_path: Path, ring: KeyRing, artifact_server: ArtifactServer, base_line: EdgeLine
) -> None:
    # Prepare: the freshly installed file is damaged before the post-swap reload
    def damage(model_path: Path) -> None:
        model_path.write_bytes(b"x")

    artifact_server.offer(base_line.artifact)
    device = make_device(tmp_path, ring, server_fetch(artifact_server), damage)

    # Execute
    outcome = device.updater.apply(signed(ring, base_line.artifact.manifest, 0))

    # Assert
    assert (outcome.result, outcome.running_model_id) == (AckResult.rolled_back, None)
    assert "rolled back to no model" in outcome.reason
    assert device.updater.load_active() is None


def test_a_document_dated_in_the_future_is_refused_and_locks_nothing_out(
    tmp_path: Path, ring: KeyRing, artifact_server: ArtifactServer, base_line: EdgeLine, v2: EdgeArtifact
) -> None:
    # Prepare: validly signed, but dated a thousand years after the device's clock
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    artifact_server.offer(v2)
    future = signed(ring, v2.manifest, 1000 * 365 * 24 * 60)

    # Execute
    refused = device.updater.apply(future)
    normal = device.updater.apply(signed(ring, v2.manifest, 2))

    # Assert
    assert_refused(refused, "in the future of this device's clock")
    assert normal.result is AckResult.installed, normal.reason


def test_a_future_date_an_older_firmware_accepted_is_forgotten(
    tmp_path: Path, ring: KeyRing, artifact_server: ArtifactServer, base_line: EdgeLine, v2: EdgeArtifact
) -> None:
    # Prepare: the replay state as a firmware without the date bound left it after a document of 2999
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    (device.root / "state" / "ota.json").write_text(
        json.dumps({"last_issued_at": "2999-01-01T00:00:00+00:00"})
    )
    artifact_server.offer(v2)

    # Execute
    outcome = device.updater.apply(signed(ring, v2.manifest, 2))

    # Assert
    assert outcome.result is AckResult.installed, outcome.reason


def test_a_device_whose_clock_is_not_set_waits_and_installs_once_it_is(
    tmp_path: Path, ring: KeyRing, artifact_server: ArtifactServer, base_line: EdgeLine, v2: EdgeArtifact
) -> None:
    # Prepare: a Raspberry Pi without a battery-backed clock, booted before NTP answered
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    artifact_server.offer(v2)
    document = signed(ring, v2.manifest, 1)
    requests = len(artifact_server.requests)
    device.updater.now = lambda: datetime(1970, 1, 1, tzinfo=UTC)

    # Execute
    waiting = device.updater.apply(document)
    fetched_while_waiting = len(artifact_server.requests) - requests
    device.updater.now = lambda: T0 + timedelta(days=1)
    later = device.updater.apply(document)

    # Assert: no ack while waiting, nothing fetched; the same document installs once the clock is set
    assert (waiting.result, waiting.retry) == (None, True) and "clock" in waiting.reason
    assert fetched_while_waiting == 0 and later.result is AckResult.installed


def test_a_document_by_a_key_not_yet_trusted_is_refused_for_now(
    tmp_path: Path, artifact_server: ArtifactServer, base_line: EdgeLine, v2: EdgeArtifact, ring: KeyRing
) -> None:
    # Prepare
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    other = KeyRing.open(tmp_path / "other-keys")
    artifact_server.offer(v2)

    # Execute
    outcome = device.updater.apply(signed(other, v2.manifest, 1))

    # Assert: refused (and acked so), but to be tried again after a trust update
    assert_refused(outcome, "unknown key_id")
    assert outcome.retry
