"""The recipes bench: every recipe alone on a suite's users, its arguments checked."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from bench.learning_recipes import main, run, summarize
from cloud.ml.scenario import parse_scenario

SWAP = """{"name": "swap", "dataset": "digits", "seed": 5,
  "presumed": {"test_fraction": 0.2, "val_fraction": 0.2},
  "users": [{"id": "sam", "label_map": {"3": 8, "8": 3}, "private_train": 150, "private_test": 100},
            {"id": "nora", "private_train": 30, "private_test": 60}]}"""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--recipes", "re-KD,magic"], "unknown recipe(s) magic"),
        (["--recipes", ","], "(none given)"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--count", "0"], "--count must be 1..1000"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    # Assert
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_summary_counts_each_recipes_outcomes() -> None:
    # Prepare
    def row(recipe: str, outcome: str, reason: str = "", gain: float = 0.0) -> dict[str, Any]:
        return {
            "recipe": recipe,
            "outcome": outcome,
            "reason": reason,
            "acc_v1": 0.8,
            "acc_candidate": 0.8 + gain,
            "untouched_change": -gain / 10,
            "seconds": 2.0,
        }

    rows = [
        row("re-KD", "approved", gain=0.1),
        row("re-KD", "rejected", "agrees with the knowledge on 90.0% of 20 changed validation samples"),
        row("re-KD", "rejected", "untouched-class accuracy falls from 97.0% to 95.0% (limit 1.0%)"),
        {"recipe": "relabel", "outcome": "not applicable", "acc_v1": 0.8},
    ]

    # Execute
    summary = {s["recipe"]: s for s in summarize(rows, ["re-KD", "relabel"])}

    # Assert
    assert summary["re-KD"] | {"candidate_gain_median": None} == {
        "recipe": "re-KD",
        "users": 3,
        "not_applicable": 0,
        "approved": 1,
        "refused_agreement": 1,
        "refused_untouched": 1,
        "no_op": 0,
        "candidate_gain_median": None,
        "untouched_change_min": pytest.approx(-0.01),
        "seconds_median": 2.0,
    }
    assert summary["re-KD"]["candidate_gain_median"] == pytest.approx(0.0)
    assert summary["relabel"]["users"] == 0 and summary["relabel"]["not_applicable"] == 1


@pytest.mark.slow
def test_a_swap_is_relabelled_exactly_and_approved() -> None:
    # Execute: the relabel recipe alone (no student training) on a clean swap
    rows, crashes = run([parse_scenario(SWAP)], ["relabel"], jobs=1, console=Console(quiet=True))

    # Assert: one row for the user with a preference; the parent's decisions relabelled keep every
    # other class exactly and follow the swap
    assert crashes == []
    assert [(r["user"], r["recipe"]) for r in rows] == [("sam", "relabel")]
    (sam,) = rows
    assert sam["outcome"] == "approved", sam.get("reason")
    assert sam["untouched_change"] == 0.0
    assert sam["acc_candidate"] > sam["acc_v1"] + 0.05
