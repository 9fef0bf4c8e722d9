"""device_firmware_py.ota.ModelSlots: A/B slots behind an atomically replaced pointer, owner-only on disk,
and a crash or torn write between stage and switch leaves the old model serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from cloud.signing import KeyRing
from device_firmware_py.exceptions import SlotError
from device_firmware_py.ota import ModelSlots
from tests.device.artifacts import ArtifactServer
from tests.device.ota_devices import assert_serves, device_on_v1, mode

if TYPE_CHECKING:
    from cloud.ml.data import ScenarioData
    from cloud.ml.export import EdgeArtifact
    from cloud.ml.line import EdgeLine

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def x(small_data: ScenarioData) -> np.ndarray[Any, Any]:
    """A few validation inputs to compare predictions on."""
    return small_data.val.x[:16]


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
