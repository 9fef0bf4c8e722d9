"""Benchmark of the learning loop: knowledge→approved time, upload sizes and int8 size/accuracy.

Runs `diredi sim` on each shared scenario, prints one table and writes bench/results/learning_loop.json.
Times are wall-clock on this machine; compare ratios measured in one run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import harness
from cloud.ml.scenario import load_scenario
from cloud.sim.run import run_simulation


def run(scenarios: list[Path]) -> dict[str, Any]:
    """Simulate every scenario and collect the figures DESIGN §7 targets."""
    rows = []
    for path in scenarios:
        started = time.perf_counter()
        result = run_simulation(load_scenario(path))
        wall = time.perf_counter() - started
        for user in result.users:
            rows.append(
                {
                    "scenario": result.scenario,
                    "user": user["id"],
                    "gap_closed": user["gap_closed"],
                    "untouched_drop": user["untouched_acc_v1"] - user["untouched_acc_v2"],
                    "knowledge_bytes": user["knowledge_bytes"],
                    # a user whose devices sent nothing has no ratio
                    "weights_over_knowledge": user["edge_weights_bytes"] / user["knowledge_bytes"]
                    if user["knowledge_bytes"]
                    else None,
                    "raw_over_knowledge": user["raw_private_bytes"] / user["knowledge_bytes"]
                    if user["knowledge_bytes"]
                    else None,
                    "knowledge_to_approved_s": user["knowledge_to_approved_s"],
                    "int8_weight_ratio": result.int8["int8_weight_bytes"] / result.int8["float_weight_bytes"],
                    "int8_file_ratio": result.int8["int8_file_bytes"] / result.int8["float_file_bytes"],
                    "int8_acc_drop": result.int8["float_acc"] - result.int8["int8_acc"],
                    "sim_wall_s": wall,
                }
            )
    return {**harness.machine_keys(), "rows": rows}


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def print_table(report: dict[str, Any], console: Console) -> None:
    """The benchmark's table; targets from issue 2 (DESIGN §7 allows 60 s for the cycle)."""
    table = harness.table(
        "Learning loop (targets: gap ≥ 0.90, drop ≤ 0.010, weights/knowledge ≥ 10, ≤ 40 s)",
        (
            "scenario", "user", "gap", "untouched drop", "knowledge B", "weights/kn", "raw/kn",
            "kn→approved s", "int8 w ratio", "int8 file ratio", "int8 acc drop", "sim wall s",
        ),
    )  # fmt: skip
    for r in report["rows"]:
        gap = "null" if r["gap_closed"] is None else f"{r['gap_closed']:.3f}"
        seconds = r["knowledge_to_approved_s"]
        table.add_row(
            r["scenario"],
            r["user"],
            gap,
            f"{r['untouched_drop']:+.4f}",
            str(r["knowledge_bytes"]),
            _ratio(r["weights_over_knowledge"]),
            _ratio(r["raw_over_knowledge"]),
            "—" if seconds is None else f"{seconds:.1f}",
            f"{r['int8_weight_ratio']:.3f}",
            f"{r['int8_file_ratio']:.3f}",
            f"{r['int8_acc_drop']:+.4f}",
            f"{r['sim_wall_s']:.0f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Run, print, write JSON."""
    args = harness.parser(__doc__, "learning_loop").parse_args(argv)
    report = run(sorted((harness.ROOT / "scenarios").glob("*.json")))
    console = Console(width=160)
    print_table(report, console)
    harness.write_results(report, args.out, console)


if __name__ == "__main__":
    main()
