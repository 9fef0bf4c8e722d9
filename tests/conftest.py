"""Shared fixtures: a small scenario and a real, quickly trained base line exported to int8."""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cloud.ml.line import EdgeLine

pytest_plugins = ["tests.databases", "tests.brokers", "tests.embedded_broker"]

# Under pytest-xdist the workers share the machine's cores: torch's (OpenMP) thread pool in each, sized
# for every core, would spin against the other's (one training test took 7x as long). One thread per
# worker, set before anything imports torch; the processes the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
# The learning loop's fixtures are seeded from this, so the suite can be run on other seeds to show
# that what the tests assert holds across data splits and numerics, not only on one lucky split.
FIXTURE_SEED = int(os.environ.get("DIREDI_TEST_FIXTURE_SEED", "3"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory under /tmp whose paths fit in a Unix socket's address (107 bytes), where a test's
    own directory may not (pytest-xdist's workers nest it one level deeper)."""
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="diredi-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def small_scenario():  # type: ignore[no-untyped-def]
    """Two users (one with a preference, one without), small private pools.

    The validation split is large enough (~300 samples) that the gate's 1.0-point limit on untouched
    classes is a few samples, not one: a candidate is not refused for one sample's worth of numerics.
    """
    from cloud.ml.scenario import parse_scenario

    return parse_scenario(
        """{"name": "small", "dataset": "digits", "seed": FIXTURE_SEED,
            "presumed": {"test_fraction": 0.2, "val_fraction": 0.3},
            "users": [
              {"id": "dana", "label_map": {"3": 8}, "private_train": 100, "private_test": 100},
              {"id": "eve", "label_map": {}, "private_train": 100, "private_test": 100}]}""".replace(
            "FIXTURE_SEED", str(FIXTURE_SEED)
        )
    )


@pytest.fixture(scope="session")
def small_data(small_scenario):  # type: ignore[no-untyped-def]
    from cloud.ml.data import build_scenario_data

    return build_scenario_data(small_scenario)


@pytest.fixture(scope="session")
def fast_plan():  # type: ignore[no-untyped-def]
    """The product's default epochs (a real, accurate model in seconds), seeded for the tests."""
    from cloud.ml.line import TrainingPlan

    return TrainingPlan(seed=FIXTURE_SEED)


@pytest.fixture(scope="session")
def base_line(small_data, fast_plan, tmp_path_factory, worker_id):  # type: ignore[no-untyped-def]
    """A real teacher, student and int8 artifact (line 'base', version 1).

    Trained once per run: the first pytest-xdist worker to ask trains it and leaves a pickle in the
    run's shared temporary directory, the other loads it (training is deterministic per seed, so it is
    the line that worker would have trained).
    """
    from cloud.ml.families import NetSpec
    from cloud.ml.line import train_line

    def train() -> EdgeLine:
        spec = NetSpec(num_classes=small_data.num_classes)
        return train_line(small_data.train, spec, fast_plan, line="base", val=small_data.val)

    if worker_id == "master":
        return train()
    shared = tmp_path_factory.getbasetemp().parent / f"base-line-{FIXTURE_SEED}.pickle"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shared.is_file():
            return pickle.loads(shared.read_bytes())  # noqa: S301 (written by this run's other worker)
        line = train()
        shared.write_bytes(pickle.dumps(line))
        return line


@pytest.fixture(scope="session")
def base_model(base_line):  # type: ignore[no-untyped-def]
    """The base artifact loaded in the device's int8 runtime."""
    return base_line.artifact.load()


# The modules that take minutes, started first: pytest-xdist hands whole modules (--dist loadfile) to its
# workers in collection order, and one of these started last would run alone at the end.
LONGEST_FIRST = (
    "tests/cloud/sim/test_sim.py",
    "tests/cloud/ml/test_cycle.py",
    "tests/cloud/test_demo.py",
    "tests/cloud/worker/test_worker.py",
    "tests/cloud/test_localsystem.py",
    "tests/cloud/api/test_schemathesis.py",
    "tests/cloud/pipeline/test_own_data.py",
    "tests/device/test_daemon_images.py",
    "tests/cloud/test_cli_ops.py",
    "tests/bench/test_learning_suite_run.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: n for n, path in enumerate(LONGEST_FIRST)}

    def place(item: pytest.Item) -> int:
        path = item.path.relative_to(ROOT).as_posix()
        return rank.get(path, len(LONGEST_FIRST))

    items.sort(key=place)  # stable: every module keeps its own order, the rest keep theirs
