"""device_firmware_py.ota: A/B slots, the artifact download against a real HTTP server, and the updater
on real int8 models and documents signed by the cloud's KeyRing; after every refusal the old model serves."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from cloud.signing import KeyRing
from device_firmware_py.exceptions import DownloadCancelled, DownloadError, SlotError
from device_firmware_py.ota import ModelSlots, UpdateOutcome, Updater, download, http_fetcher
from tests.device.artifacts import DEVICE, MAX_BYTES, SECRET, T0, ArtifactServer, Route, signed
from wire import AckResult, ArtifactManifest, DesiredModel, EncodedArray

if TYPE_CHECKING:
    from cloud.ml.cycle import EdgeLine
    from cloud.ml.data import ScenarioData
    from cloud.ml.export import EdgeArtifact

ROOT = Path(__file__).resolve().parents[2]


# --- downloads and devices ----------------------------------------------------------------------


def fetch_bytes(
    server: ArtifactServer,
    artifact: EdgeArtifact,
    cancelled: threading.Event | None = None,
    ca_file: Path | None = None,
) -> bytes:
    """Download `artifact` from `server` as the device would."""
    return download(
        server.url,
        f"/api/v1/artifacts/{artifact.manifest.sha256}",
        device_id=DEVICE,
        secret=SECRET,
        expected_size=artifact.manifest.size,
        max_bytes=MAX_BYTES,
        ca_file=ca_file,
        timeout=10.0,
        cancelled=cancelled or threading.Event(),
    )


@dataclass
class Device:
    """One device's OTA state on disk and its updater."""

    root: Path
    slots: ModelSlots
    updater: Updater


def make_device(
    root: Path,
    ring: KeyRing,
    fetch: Callable[[DesiredModel], bytes],
    on_switched: Callable[[Path], None] | None = None,
) -> Device:
    """A device trusting `ring`'s keys, with its slots and replay state under `root`."""
    slots = ModelSlots(root / "models")
    updater = Updater(
        DEVICE, ring.trusted(), slots, fetch, root / "state" / "ota.json", on_switched=on_switched
    )
    return Device(root, slots, updater)


def server_fetch(server: ArtifactServer) -> Callable[[DesiredModel], bytes]:
    """The device's real HTTP fetch from `server`."""
    return http_fetcher(
        server.url,
        device_id=DEVICE,
        secret=SECRET,
        max_bytes=MAX_BYTES,
        ca_file=None,
        timeout=10.0,
        cancelled=threading.Event(),
    )


def device_on_v1(
    tmp_path: Path,
    ring: KeyRing,
    server: ArtifactServer,
    v1: EdgeArtifact,
    on_switched: Callable[[Path], None] | None = None,
) -> Device:
    """A device that installed v1 through a signed document issued at T0."""
    server.offer(v1)
    device = make_device(tmp_path, ring, server_fetch(server), on_switched)
    outcome = device.updater.apply(signed(ring, v1.manifest, 0))
    assert outcome.result is AckResult.installed, outcome.reason
    return device


def assert_serves(device: Device, artifact: EdgeArtifact, x: np.ndarray[Any, Any]) -> None:
    """The device, started afresh from disk, loads `artifact` and predicts what it predicts."""
    model = Updater(DEVICE, {}, ModelSlots(device.slots.root), lambda d: b"", device.root / "x").load_active()
    assert model is not None
    assert model.manifest.model_id == artifact.manifest.model_id
    assert model.manifest.sha256 == artifact.manifest.sha256
    assert np.array_equal(model.predict(x), artifact.load().predict(x))


def assert_refused(outcome: UpdateOutcome, reason: str, running: str | None = "base.v1") -> None:
    """A failed outcome naming the check, with `running` still serving."""
    assert outcome.result is AckResult.failed
    assert reason in outcome.reason, outcome.reason
    assert outcome.running_model_id == running
    assert outcome.model is None


@pytest.fixture
def x(small_data: ScenarioData) -> np.ndarray[Any, Any]:
    """A few validation inputs to compare predictions on."""
    return small_data.val.x[:16]


def mode(path: Path) -> int:
    """The permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)


# --- ModelSlots ---------------------------------------------------------------------------------


def test_empty_slots_have_nothing_active_and_are_owner_only(tmp_path: Path) -> None:
    # Execute
    slots = ModelSlots(tmp_path / "models")

    # Assert
    assert slots.active() is None
    assert {mode(tmp_path / "models"), mode(tmp_path / "models" / "a"), mode(tmp_path / "models" / "b")} == {
        0o700
    }


def test_stage_switch_roll_back(tmp_path: Path, base_line: EdgeLine, v2: EdgeArtifact) -> None:
    # Prepare
    slots = ModelSlots(tmp_path)
    v1 = base_line.artifact
    slots.stage(v1.model, v1.manifest)
    slots.switch()

    # Execute
    staged = slots.stage(v2.model, v2.manifest)
    active_while_staged = slots.active()
    staged_contents = slots.staged()
    slots.switch()
    active_after_switch = slots.active()
    slots.roll_back()

    # Assert
    assert staged == "b"
    assert active_while_staged is not None and active_while_staged[1].model_id == "base.v1"
    assert staged_contents == (tmp_path / "b" / "model.tflite", v2.manifest)
    assert active_after_switch == (tmp_path / "b" / "model.tflite", v2.manifest)
    assert slots.active() == (tmp_path / "a" / "model.tflite", v1.manifest)
    for name in ("a", "b"):
        assert mode(tmp_path / name / "model.tflite") == mode(tmp_path / name / "manifest.json") == 0o600
    assert mode(tmp_path / "active.json") == 0o600


def test_switch_without_a_staged_model_is_refused(tmp_path: Path) -> None:
    # Prepare
    slots = ModelSlots(tmp_path)

    # Execute / Assert
    with pytest.raises(SlotError, match="nothing is staged"):
        slots.switch()


CRASH_CHILD = """
import os, sys
from pathlib import Path
from device_firmware_py.ota import ModelSlots
from wire import ArtifactManifest
slots = ModelSlots(Path(sys.argv[1]))
slots.stage(Path(sys.argv[2]).read_bytes(), ArtifactManifest.from_json(Path(sys.argv[3]).read_bytes()))
os._exit(9)  # the process dies between stage and switch: no cleanup, no switch
"""


def test_a_crash_between_stage_and_switch_leaves_the_old_model_active(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
    x: Any,
) -> None:
    # Prepare
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    (tmp_path / "v2.tflite").write_bytes(v2.model)
    (tmp_path / "v2.json").write_text(v2.manifest.to_json())

    # Execute
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            CRASH_CHILD,
            str(device.slots.root),
            str(tmp_path / "v2.tflite"),
            str(tmp_path / "v2.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert
    assert child.returncode == 9, child.stderr
    assert (device.slots.root / "b" / "model.tflite").read_bytes() == v2.model  # staged, never switched
    assert_serves(device, base_line.artifact, x)


def test_a_torn_write_in_the_inactive_slot_leaves_the_old_model_active(
    tmp_path: Path,
    ring: KeyRing,
    artifact_server: ArtifactServer,
    base_line: EdgeLine,
    v2: EdgeArtifact,
    x: Any,
) -> None:
    # Prepare: a crash in the middle of staging leaves half a file and a stale temp file behind
    device = device_on_v1(tmp_path, ring, artifact_server, base_line.artifact)
    (device.slots.root / "b" / "model.tflite").write_bytes(v2.model[: len(v2.model) // 2])
    (device.slots.root / "b" / ".manifest.json.tmp").write_bytes(b'{"schema": "diredi.man')

    # Execute
    slots = ModelSlots(device.slots.root)

    # Assert
    with pytest.raises(SlotError, match="nothing is staged"):
        slots.switch()
    assert_serves(device, base_line.artifact, x)


# --- download -----------------------------------------------------------------------------------


def test_download_returns_the_artifact_with_device_credentials(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare
    artifact_server.offer(v2)

    # Execute
    body = fetch_bytes(artifact_server, v2)

    # Assert
    assert body == v2.model
    assert artifact_server.requests == [f"/api/v1/artifacts/{v2.manifest.sha256}"]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("truncate", r"truncated: \d+ of \d+ bytes arrived"),
        ("claim_more", "oversized: Content-Length 1000000000 exceeds"),
        ("no_length", "oversized: more than the expected"),
        ("redirect", "HTTP 302"),
    ],
)
def test_download_refuses_a_bad_body(
    artifact_server: ArtifactServer, v2: EdgeArtifact, mode: str, reason: str
) -> None:
    # Prepare: no_length streams the artifact and more, with no Content-Length to refuse up front
    body = v2.model + b"\0" * 100_000 if mode == "no_length" else v2.model
    artifact_server.offer(v2, body, mode)

    # Execute / Assert
    with pytest.raises(DownloadError, match=reason):
        fetch_bytes(artifact_server, v2)


def test_download_refuses_a_body_shorter_than_the_manifest(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare: a well-formed response that simply holds too few bytes
    artifact_server.offer(v2, v2.model[:-10])

    # Execute / Assert
    with pytest.raises(
        DownloadError, match=f"truncated: {v2.manifest.size - 10} of {v2.manifest.size} bytes"
    ):
        fetch_bytes(artifact_server, v2)


def test_download_refuses_an_artifact_larger_than_max_bytes(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare
    artifact_server.offer(v2)

    # Execute / Assert
    with pytest.raises(DownloadError, match="oversized: the artifact has"):
        download(
            artifact_server.url,
            f"/api/v1/artifacts/{v2.manifest.sha256}",
            device_id=DEVICE,
            secret=SECRET,
            expected_size=v2.manifest.size,
            max_bytes=v2.manifest.size - 1,
            ca_file=None,
            timeout=10.0,
            cancelled=threading.Event(),
        )
    assert artifact_server.requests == []  # refused before connecting


@pytest.mark.parametrize(
    ("status", "reason"),
    [(404, "HTTP 404 .*not offered"), (403, "HTTP 403 .*may not download"), (503, "HTTP 503 .*server error")],
)
def test_download_maps_http_errors(
    artifact_server: ArtifactServer, v2: EdgeArtifact, status: int, reason: str
) -> None:
    # Prepare
    if status != 404:
        artifact_server.routes[f"/api/v1/artifacts/{v2.manifest.sha256}"] = Route(b"", "status", status)

    # Execute / Assert
    with pytest.raises(DownloadError, match=reason):
        fetch_bytes(artifact_server, v2)


def test_download_with_wrong_credentials_is_unauthorized(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare
    artifact_server.offer(v2)

    # Execute / Assert
    with pytest.raises(DownloadError, match="HTTP 401 .*credentials were refused"):
        download(
            artifact_server.url,
            f"/api/v1/artifacts/{v2.manifest.sha256}",
            device_id=DEVICE,
            secret="wrong-secret",  # noqa: S106 - deliberately not the device's
            expected_size=v2.manifest.size,
            max_bytes=MAX_BYTES,
            ca_file=None,
            timeout=10.0,
            cancelled=threading.Event(),
        )


def test_download_from_an_unreachable_server_is_a_network_error(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare: a port nobody listens on
    artifact_server.url = "http://127.0.0.1:9"

    # Execute / Assert
    with pytest.raises(DownloadError, match="network error: ConnectionRefusedError"):
        fetch_bytes(artifact_server, v2)


@pytest.mark.parametrize("mode", ["slow", "stall"])
def test_cancelling_stops_a_download_promptly(
    artifact_server: ArtifactServer, v2: EdgeArtifact, mode: str
) -> None:
    # Prepare: `slow` trickles 512 B every 50 ms (minutes for the artifact); `stall` sends 100 B, then nothing
    artifact_server.offer(v2, mode=mode)
    cancelled = threading.Event()
    threading.Timer(0.3, cancelled.set).start()
    started = time.monotonic()

    # Execute / Assert
    with pytest.raises(DownloadCancelled):
        fetch_bytes(artifact_server, v2, cancelled)
    assert time.monotonic() - started < 2.0


def test_download_over_tls_verifies_the_server_against_the_ca_file(
    tls_server: ArtifactServer, certs: Path, v2: EdgeArtifact
) -> None:
    # Prepare
    tls_server.offer(v2)

    # Execute
    body = fetch_bytes(tls_server, v2, ca_file=certs / "ca.crt")

    # Assert
    assert body == v2.model
    with pytest.raises(DownloadError, match="network error: SSLCertVerificationError"):
        fetch_bytes(tls_server, v2)  # the system's CAs do not know the lab CA


def test_cancelling_stops_a_stalled_tls_download(
    tls_server: ArtifactServer, certs: Path, v2: EdgeArtifact
) -> None:
    # Prepare
    tls_server.offer(v2, mode="stall")
    cancelled = threading.Event()
    threading.Timer(0.3, cancelled.set).start()
    started = time.monotonic()

    # Execute / Assert
    with pytest.raises(DownloadCancelled):
        fetch_bytes(tls_server, v2, cancelled, ca_file=certs / "ca.crt")
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("url", ["ftp://127.0.0.1", "http://127.0.0.1:port", "not a url"])
def test_download_refuses_a_url_it_cannot_use(v2: EdgeArtifact, url: str) -> None:
    # Prepare
    server = ArtifactServer(url=url)

    # Execute / Assert
    with pytest.raises(DownloadError, match="is not an http\\(s\\) URL"):
        fetch_bytes(server, v2)


# --- Updater ------------------------------------------------------------------------------------


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
        secret=SECRET,
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
