"""The beat passes benchmark on a small registry: an idle pass of each task sends at most three
statements, and the passes after the changes act on exactly them."""

from __future__ import annotations

from bench import beat_passes
from tests.databases import postgres_admin_url


def test_idle_passes_send_a_few_statements_and_the_changes_are_acted_on() -> None:
    # Execute
    report = beat_passes.run(postgres_admin_url(), [1_000], say=lambda _: None)

    # Assert
    (one,) = report["runs"]
    passes = {(p["task"], p["case"]): p for p in one["passes"]}
    for task in beat_passes.TASKS:
        for case in ("idle", "idle again"):
            assert passes[task, case]["statements"] <= 3 and passes[task, case]["rows_returned"] == 0
    assert passes["schedule_cycles", "changed"]["result"] == beat_passes.CHANGES["reports"]
    assert passes["reconcile_desired", "changed"]["result"] == beat_passes.CHANGES["devices"]
