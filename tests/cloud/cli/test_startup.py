"""`diredi` imports a command's module only when that command runs: a registry-side command does not
load the API's schemas, and no command but those that train loads PyTorch (a worker loads it with its
first job)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Runs `diredi <args>` in a fresh interpreter, then writes the names of the modules it imported.
PROBE = """
import json, sys
out, sys.argv = sys.argv[1], ["diredi", *sys.argv[2:]]
from cloud.cli.main import main
try:
    main()
except SystemExit:
    pass
with open(out, "w") as f:
    json.dump(sorted(sys.modules), f)
"""


@pytest.mark.parametrize(
    ("args", "not_loaded"),
    [
        (["--version"], ["sqlalchemy", "fastapi", "numpy", "torch"]),
        (["broker", "init", "--help"], ["cloud.api.schemas", "fastapi", "httpx", "torch"]),
        (["db", "--help"], ["cloud.api.schemas", "fastapi", "torch"]),
        (["devices", "list", "--help"], ["cloud.pipeline.cycle", "torch"]),
    ],
    ids=lambda value: " ".join(value),
)
def test_a_command_loads_only_its_own_modules(args: list[str], not_loaded: list[str], tmp_path: Path) -> None:
    # Execute
    modules_file = tmp_path / "modules.json"
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", PROBE, str(modules_file), *args], capture_output=True, text=True, timeout=120
    )

    # Assert: it ran (its help or version printed), and left the others' modules alone
    assert done.returncode == 0, done.stderr
    assert "diredi" in done.stdout.lower()
    loaded = set(json.loads(modules_file.read_text()))
    assert "cloud.cli.main" in loaded
    assert loaded.isdisjoint(not_loaded), sorted(loaded.intersection(not_loaded))


def test_a_worker_loads_pytorch_with_its_first_job_not_at_start() -> None:
    # Execute: what a worker process imports before its first job (its Celery app and tasks)
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", "import sys, cloud.worker.tasks; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
