"""The device package imports and runs RD in a process where torch (and the cloud package) cannot load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cloud.ml.data import ScenarioData
    from cloud.ml.line import EdgeLine

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: argv = model path, manifest path, inputs .npy, labels .npy.
CHILD = """
import importlib.abc
import json
import sys

BLOCKED = {"torch", "cloud"}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked on the device")
        return None


sys.meta_path.insert(0, Blocker())
try:
    import torch  # noqa: F401
    blocked = False
except ImportError:
    blocked = True

from pathlib import Path

import numpy as np

from device_firmware_py.rd import extract_knowledge
from device_firmware_py.runtime import Int8Model

model = Int8Model.from_files(Path(sys.argv[1]), Path(sys.argv[2]))
model.self_test()
report = extract_knowledge(model, np.load(sys.argv[3]), np.load(sys.argv[4]), device_id="dev-1")
print(json.dumps({
    "blocked": blocked,
    "report_bytes": len(report.to_bytes()),
    "sample_count": report.sample_count,
    "base_model_id": report.base_model_id,
    "torch_loaded": "torch" in sys.modules,
    "cloud_loaded": any(m == "cloud" or m.startswith("cloud.") for m in sys.modules),
}))
"""


def run_child(*args: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_device_runs_rd_without_torch(base_line: EdgeLine, small_data: ScenarioData, tmp_path: Path) -> None:
    # Prepare
    model_path = base_line.artifact.save(tmp_path / "artifact")
    manifest_path = model_path.with_suffix(".manifest.json")
    pool = small_data.users[0].device_train[0]
    np.save(tmp_path / "x.npy", pool.x[:40])
    np.save(tmp_path / "y.npy", pool.y[:40])

    # Execute
    child = run_child(model_path, manifest_path, tmp_path / "x.npy", tmp_path / "y.npy")

    # Assert
    assert child.returncode == 0, child.stderr
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["blocked"] is True  # the finder really keeps torch out
    assert result["torch_loaded"] is False
    assert result["cloud_loaded"] is False
    assert result["sample_count"] == 40
    assert result["base_model_id"] == base_line.artifact.manifest.model_id
    assert 0 < result["report_bytes"] <= 256 * 1024


def test_the_daemon_and_its_command_import_without_torch_or_the_cloud() -> None:
    # Prepare: a fresh interpreter in which torch, the cloud package and its server libraries cannot load
    child = (
        "import importlib.abc, sys\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in {'torch', 'cloud', 'sqlalchemy', 'fastapi', 'celery'}:\n"
        "            raise ImportError(name + ' is blocked on the device')\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "import device_firmware_py.daemon, device_firmware_py.cli\n"
        "print('imported')\n"
    )

    # Execute
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=120, cwd=ROOT
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"
