"""A small generated suite through the real simulation: no crash, and the loop's verdict rules hold."""

from __future__ import annotations

import pytest
from rich.console import Console

from bench.learning_suite import run, summarize
from cloud.sim.generate import generate_scenario

pytestmark = pytest.mark.slow
OUTCOMES = {"approved", "rejected", "no-op", "no-report", "export-failed"}


def test_a_generated_scenario_runs_and_keeps_the_gates_promises() -> None:
    # Prepare: from a seed range no default was chosen on: a user without a preference (two devices)
    # and one who merges two classes
    scenario = generate_scenario(7000, 49)

    # Execute
    rows, crashes, runs = run([scenario], jobs=1, console=Console(quiet=True))
    summary = summarize(rows, crashes)

    # Assert
    assert crashes == []
    assert len(rows) == len(scenario.users) and len(runs) == 1
    assert summary["targets"]  # the summary judges the targets it can
    for row in rows:
        assert row["gate_outcome"] in OUTCOMES and row["gate_dp_outcome"] in OUTCOMES
        if row["gate_outcome"] != "approved":  # a refused or empty cycle leaves the user on v1
            assert row["acc_v2"] == row["acc_v1"]
        else:
            assert sum(c["status"] == "chosen" for c in row["candidates"]) == 1
        assert row["acc_v2"] >= row["acc_v1"] - 0.010  # no update makes a device worse
        assert row["acc_dp"] >= row["acc_v1"] - 0.010  # nor with DP: noise is not a preference
        if row["kind"] == "none":
            assert row["gate_outcome"] in {"no-op", "no-report"}
