"""An OTA device under test: its slots and updater on disk, installing from a real artifact server."""

from __future__ import annotations

import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud.signing import KeyRing
from device_firmware_py.config import Identity
from device_firmware_py.download import http_fetcher
from device_firmware_py.ota import ModelSlots, UpdateOutcome, Updater
from tests.device.artifacts import DEVICE, MAX_BYTES, SECRET, T0, ArtifactServer, signed
from wire import AckResult, DesiredModel

if TYPE_CHECKING:
    from cloud.ml.export import EdgeArtifact


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
    """A device trusting `ring`'s keys, with its slots and replay state under `root`; its clock reads a
    day after T0, when the test documents were issued."""
    slots = ModelSlots(root / "models")
    updater = Updater(
        DEVICE,
        ring.trusted(),
        slots,
        fetch,
        root / "state" / "ota.json",
        now=lambda: T0 + timedelta(days=1),
        on_switched=on_switched,
    )
    return Device(root, slots, updater)


def server_fetch(server: ArtifactServer) -> Callable[[DesiredModel], bytes]:
    """The device's real HTTP fetch from `server`."""
    return http_fetcher(
        server.url,
        device_id=DEVICE,
        identity=Identity(secret=SECRET),
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


def mode(path: Path) -> int:
    """The permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)
