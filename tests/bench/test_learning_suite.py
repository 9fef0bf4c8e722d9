"""The learning-suite benchmark's bookkeeping on hand-made rows: summary, per-user rows, crashes, plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.learning_suite import ALL_WITH_PREFERENCE, crash_text, summarize, user_row, write_plot
from cloud.ml.scenario import Scenario


def row(kind: str, v1: float | None, v2: float | None, oracle: float | None, **extra: Any) -> dict[str, Any]:
    """A benchmark row as user_row makes it, the gaps computed from the accuracies."""
    dp = extra.pop("acc_dp", v2)

    def closed(acc: float | None) -> float | None:
        if v1 is None or acc is None or oracle is None or oracle - v1 < 0.02:
            return None
        return (acc - v1) / (oracle - v1)

    base: dict[str, Any] = {
        "scenario": "s",
        "user": f"u-{kind}",
        "kind": kind,
        "acc_v1": v1,
        "acc_v2": v2,
        "acc_oracle": oracle,
        "acc_dp": dp,
        "gap_closed": closed(v2),
        "gap_closed_dp": closed(dp),
        "untouched_change": -0.005,
        "change": None if v1 is None or v2 is None else v2 - v1,
        "dp_change": None if v1 is None or dp is None else dp - v1,
        "gate_outcome": "approved",
        "gate_reason": "ok",
        "gate_dp_outcome": "approved",
        "gate_dp_reason": "ok",
        "knowledge_to_approved_s": 10.0,
    }
    base.update(extra)
    return base


def scenario() -> Scenario:
    return Scenario.model_validate(
        {
            "name": "hand",
            "dataset": "digits",
            "seed": 3,
            "presumed": {"test_fraction": 0.2},
            "users": [
                {"id": "ana", "label_map": {"3": 8, "8": 3}, "noise_std": 1.5, "private_train": 40,
                 "private_test": 100, "devices": 3},
                {"id": "ben", "private_train": 40, "private_test": 100},
            ],
        }
    )  # fmt: skip


def test_summary_per_kind_gives_min_p10_median_and_counts_below_v1() -> None:
    # Prepare: merge users closing 1.0, 0.5 and -0.25 of a 0.2 gap; one swap user closing 0.95
    rows = [
        row("merge", 0.8, 1.0, 1.0),
        row("merge", 0.8, 0.9, 1.0),
        row("merge", 0.8, 0.75, 1.0, untouched_change=-0.03),
        row("swap", 0.8, 0.99, 1.0),
    ]

    # Execute
    summary = summarize(rows)

    # Assert
    merge = summary["kinds"]["merge"]
    assert merge["n"] == 3 and merge["n_gap"] == 3
    assert merge["gap_min"] == pytest.approx(-0.25)
    assert merge["gap_median"] == pytest.approx(0.5)
    assert merge["gap_p10"] == pytest.approx(-0.25 + 0.2 * 0.75)  # linear between the two lowest
    assert merge["untouched_change_min"] == pytest.approx(-0.03)
    assert merge["below_v1"] == 1
    overall = summary["kinds"][ALL_WITH_PREFERENCE]
    assert overall["n"] == 4
    assert overall["gap_median"] == pytest.approx(0.725)
    assert summary["kinds"]["cycle"]["n"] == 0 and summary["kinds"]["cycle"]["gap_median"] is None


def test_summary_counts_dp_users_below_v1_only_beyond_one_point() -> None:
    # Prepare
    rows = [
        row("swap", 0.80, 0.95, 1.0, acc_dp=0.795),  # 0.5 point down: tolerated
        row("swap", 0.80, 0.95, 1.0, acc_dp=0.78),  # 2 points down
        row("cycle", 0.80, 0.95, 1.0, acc_dp=0.9),
    ]

    # Execute
    summary = summarize(rows)

    # Assert
    assert summary["kinds"]["swap"]["dp_below_v1"] == 1
    assert summary["kinds"]["swap"]["gap_dp_min"] == pytest.approx(-0.1)
    assert summary["kinds"]["cycle"]["gap_dp_median"] == pytest.approx(0.5)
    assert summary["kinds"][ALL_WITH_PREFERENCE]["dp_below_v1"] == 1


def test_summary_keeps_users_without_a_preference_apart() -> None:
    # Prepare
    rows = [row("none", 0.9, 0.89, 0.905), row("none", 0.9, 0.9, 0.9), row("mix", 0.7, 0.9, 0.9)]

    # Execute
    summary = summarize(rows)

    # Assert
    assert summary["no_preference"] == {
        "n": 2,
        "change_min": pytest.approx(-0.01),
        "change_median": pytest.approx(-0.005),
    }
    assert summary["kinds"][ALL_WITH_PREFERENCE]["n"] == 1


def test_summary_tolerates_missing_accuracies_and_gaps() -> None:
    # Prepare: a user whose simulation measured nothing, and one with nothing to gain
    rows = [row("merge", None, None, None), row("swap", 0.9, 0.9, 0.91)]

    # Execute
    summary = summarize(rows)

    # Assert
    assert summary["kinds"]["merge"]["n"] == 1
    assert summary["kinds"]["merge"]["n_gap"] == 0
    assert summary["kinds"]["merge"]["gap_min"] is None
    assert summary["kinds"]["swap"]["gap_median"] is None
    assert summary["kinds"]["swap"]["below_v1"] == 0
    assert summary["targets"][next(k for k in summary["targets"] if k.startswith("median"))] is False


def test_summary_counts_gate_outcomes_and_kinds_of_reasons_for_both_cycles() -> None:
    # Prepare: two rejections for the same reason with different figures
    rows = [
        row("merge", 0.8, 1.0, 1.0, gate_outcome="rejected", gate_reason="agreement 93.3% of 45"),
        row("merge", 0.8, 1.0, 1.0, gate_dp_outcome="rejected", gate_dp_reason="agreement 90% of 12"),
        row("none", 0.9, 0.9, 0.9, gate_outcome="no-op", gate_reason="nothing", gate_dp_outcome="no-op",
            gate_dp_reason="nothing"),
    ]  # fmt: skip

    # Execute
    gates = summarize(rows)["gates"]

    # Assert
    assert gates == [
        {"outcome": "approved", "reason": "ok", "diredi": 1, "dp": 1},
        {"outcome": "no-op", "reason": "nothing", "diredi": 1, "dp": 1},
        {"outcome": "rejected", "reason": "agreement N% of N", "diredi": 1, "dp": 1},
    ]


def test_summary_reports_timing_crashes_and_targets() -> None:
    # Prepare
    rows = [row("swap", 0.8, 1.0, 1.0, knowledge_to_approved_s=s) for s in (10.0, 20.0, 30.0, 40.0)]
    rows.append(row("swap", 0.8, 0.8, 0.8, knowledge_to_approved_s=None))
    crashes = [{"scenario": "gen-s1-3", "error": "RuntimeError: boom"}]

    # Execute
    summary = summarize(rows, crashes)

    # Assert
    assert summary["knowledge_to_approved_s"] == {"n": 4, "median": 25.0, "p90": pytest.approx(37.0)}
    assert summary["crashes"] == 1
    targets = summary["targets"]
    assert targets["no_crash"] is False
    assert targets["no_user_with_a_preference_below_v1"] is True
    assert [v for k, v in targets.items() if k.startswith(("median", "p10"))] == [True, True]


def test_user_row_computes_changes_and_passes_unknown_keys_through() -> None:
    # Prepare: a simulation row with keys the benchmark does not know
    sim = {
        "id": "ana", "devices": 3, "acc_v1": 0.8, "acc_v2": 0.95, "acc_oracle": 1.0, "acc_local": 0.9,
        "acc_dp": 0.9, "gap_closed": 0.75, "untouched_acc_v1": 0.9, "untouched_acc_v2": 0.89,
        "knowledge_to_approved_s": 12.5, "gate": {"outcome": "approved", "reason": "ok", "moved": 40},
        "gate_dp": {"outcome": "rejected", "reason": "agreement"}, "export": {"bytes": 123},
        "candidates": [{"beta": 4}],
    }  # fmt: skip

    # Execute
    out = user_row(scenario(), sim)

    # Assert
    assert out["scenario"] == "hand" and out["user"] == "ana"
    assert (out["kind"], out["noise"], out["devices"], out["private_train"]) == ("swap", 1.5, 3, 40)
    assert out["gap_closed"] == 0.75
    assert out["gap_closed_dp"] == pytest.approx(0.5)
    assert out["untouched_change"] == pytest.approx(-0.01)
    assert out["change"] == pytest.approx(0.15)
    assert out["dp_change"] == pytest.approx(0.1)
    assert (out["gate_outcome"], out["gate_reason"]) == ("approved", "ok")
    assert (out["gate_dp_outcome"], out["gate_dp_reason"]) == ("rejected", "agreement")
    assert out["export"] == {"bytes": 123} and out["candidates"] == [{"beta": 4}]
    assert out["gate"]["moved"] == 40
    assert "id" not in out


def test_user_row_tolerates_missing_accuracies_and_gates() -> None:
    # Prepare
    sim: dict[str, Any] = {"id": "ben", "acc_v1": 0.9, "acc_v2": None, "acc_oracle": 0.95, "acc_dp": None}

    # Execute
    out = user_row(scenario(), sim)

    # Assert
    assert out["kind"] == "none"
    assert out["gap_closed"] is None and out["gap_closed_dp"] is None
    assert out["change"] is None and out["untouched_change"] is None
    assert out["gate_outcome"] is None


def test_gap_closed_dp_is_none_when_the_oracle_gains_less_than_two_points() -> None:
    # Execute
    out = user_row(scenario(), {"id": "ana", "acc_v1": 0.9, "acc_oracle": 0.915, "acc_dp": 0.91})

    # Assert
    assert out["gap_closed_dp"] is None


def test_crash_text_is_the_exception_type_and_first_line() -> None:
    # Execute / Assert
    assert crash_text(RuntimeError("boom\nmore detail")) == "RuntimeError: boom"
    assert crash_text(ValueError()) == "ValueError"


def test_plot_is_written_for_rows_with_and_without_gaps(tmp_path: Path) -> None:
    # Prepare
    rows = [row("merge", 0.8, 1.0, 1.0), row("swap", 0.8, 0.7, 1.0, acc_dp=0.9), row("none", 0.9, 0.9, 0.9)]
    path = tmp_path / "suite.png"

    # Execute
    write_plot(rows, path)

    # Assert
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
