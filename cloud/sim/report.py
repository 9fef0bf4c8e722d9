"""Presenting a simulation: the table of DESIGN §3 (rich), RESULT.json and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cloud.sim.run import SimResult


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def accuracy_table(result: SimResult) -> Table:
    """Accuracy of every model on each user's world, int8 as deployed."""
    table = Table(title=f"DiReDi on {result.scenario}: accuracy (%) on each user's world, int8 models")
    for col in (
        "user",
        "edge v1",
        "device-only",
        "DiReDi v2",
        "raw upload",
        "oracle",
        "DiReDi+DP (ε)",
        "gap closed",
    ):
        table.add_column(col, justify="right" if col != "user" else "left")
    for u in result.users:
        gap = "— (nothing to gain)" if u["gap_closed"] is None else f"{u['gap_closed']:.2f}"
        table.add_row(
            u["id"],
            _pct(u["acc_v1"]),
            _pct(u["acc_local"]),
            _pct(u["acc_v2"]),
            _pct(u["acc_raw"]),
            _pct(u["acc_oracle"]),
            f"{_pct(u['acc_dp'])} ({u['dp_epsilon']:g})",
            gap,
        )
    return table


def detail_table(result: SimResult) -> Table:
    """Untouched classes, bytes uploaded, cycle time and the gate's verdict per user."""
    table = Table(title="Untouched classes, upload size and the gate")
    for col in (
        "user",
        "untouched v1→v2",
        "knowledge B",
        "edge weights B",
        "raw data B",
        "knowledge→approved",
        "gate",
    ):
        table.add_column(col)
    for u in result.users:
        seconds = u["knowledge_to_approved_s"]
        table.add_row(
            u["id"],
            f"{_pct(u['untouched_acc_v1'])} → {_pct(u['untouched_acc_v2'])}",
            f"{u['knowledge_bytes']:,}",
            f"{u['edge_weights_bytes']:,} (1/{u['edge_weights_bytes'] / max(u['knowledge_bytes'], 1):.0f})",
            f"{u['raw_private_bytes']:,} (1/{u['raw_private_bytes'] / max(u['knowledge_bytes'], 1):.1f})",
            "—" if seconds is None else f"{seconds:.1f} s",
            u["gate"]["outcome"],
        )
    return table


def int8_table(result: SimResult) -> Table:
    """The base edge model, float vs int8."""
    q = result.int8
    table = Table(title="Edge model: float32 vs int8 (presumed test split)")
    for col in ("", "accuracy %", "weight tensors B", "file B"):
        table.add_column(col, justify="right")
    table.add_row(
        "float32", _pct(q["float_acc"]), f"{q['float_weight_bytes']:,}", f"{q['float_file_bytes']:,}"
    )
    table.add_row(
        "int8",
        _pct(q["int8_acc"]),
        f"{q['int8_weight_bytes']:,} ({q['int8_weight_bytes'] / q['float_weight_bytes']:.2f}×)",
        f"{q['int8_file_bytes']:,} ({q['int8_file_bytes'] / q['float_file_bytes']:.2f}×)",
    )
    return table


def print_report(result: SimResult, console: Console) -> None:
    """All tables, then the stage timings."""
    console.print(accuracy_table(result))
    console.print(detail_table(result))
    for u in result.users:
        console.print(f"gate for {u['id']}: {u['gate']['outcome']}: {u['gate']['reason']}")
        console.print(f"gate for {u['id']} with DP: {u['gate_dp']['outcome']}: {u['gate_dp']['reason']}")
    console.print(int8_table(result))
    total = sum(v for k, v in result.timings_s.items() if "." not in k or k.endswith(".total"))
    console.print(f"total {total:.1f} s: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings_s.items()))


def write_json(result: SimResult, path: Path) -> None:
    """RESULT.json."""
    path.write_text(json.dumps(result.as_dict(), indent=2, sort_keys=False) + "\n")


def write_plot(result: SimResult, path: Path) -> None:
    """Grouped bars of every model's accuracy per user."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: list[tuple[str, str]] = [
        ("edge v1", "acc_v1"),
        ("device-only", "acc_local"),
        ("DiReDi v2", "acc_v2"),
        ("raw upload", "acc_raw"),
        ("oracle", "acc_oracle"),
        ("DiReDi + DP", "acc_dp"),
    ]
    users = result.users
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(users)), 4))
    for i, (label, key) in enumerate(series):
        values: list[Any] = [100 * (u[key] or 0.0) for u in users]
        ax.bar([j + i * width for j in range(len(users))], values, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(users))], [u["id"] for u in users])
    ax.set_ylabel("accuracy on the user's world (%)")
    ax.set_ylim(50, 100)
    ax.set_title(f"DiReDi on {result.scenario}")
    ax.legend(fontsize="small", ncol=3, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
