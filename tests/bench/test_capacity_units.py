"""The capacity units benchmark's quick run on a real mosquitto: every retained desired model costs the
broker at least its own bytes, in memory and in its persistence file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import capacity_units
from broker.exceptions import MosquittoError
from broker.mosquitto import find_binary, find_plugin


@pytest.fixture
def mosquitto() -> None:
    """Skips the test where mosquitto is missing."""
    try:
        find_binary("mosquitto")
        find_plugin()
    except MosquittoError as exc:
        pytest.skip(f"no mosquitto here: {exc}")


@pytest.mark.usefixtures("mosquitto")
def test_each_retained_desired_model_costs_mosquitto_at_least_its_bytes(tmp_path: Path) -> None:
    # Execute
    capacity_units.main(["--quick", "--out", str(tmp_path / "report.json")])

    # Assert
    report = json.loads((tmp_path / "report.json").read_text())
    sizes, broker = report["bytes"], report["mosquitto"]
    assert (report["documents"], report["quick"]) == (1_000, True)
    assert 4_000 < sizes["desired"] <= 16 * 1024  # DESIGN §2's cap on a desired model
    assert sizes["manifest"] < sizes["desired"]
    assert 0 < sizes["presence"] < sizes["status"] <= 8 * 1024
    assert len(broker["checkpoints"]) == capacity_units.CHECKPOINTS + 1
    assert broker["rss_bytes_per_desired"] > sizes["desired"]
    assert broker["persistence_bytes_per_device"] > sizes["desired"] + sizes["presence"]
    assert broker["rss_mb_after_restart"] > broker["rss_mb_idle"]
    assert {"cpus", "python", "machine"} <= report.keys()
