"""Presenting a simulation: the table of DESIGN §3 (rich), RESULT.json and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from cloud.sim.run import SimResult


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _gap(user: dict[str, Any]) -> str:
    if user["gap_closed"] is not None:
        return f"{user['gap_closed']:.2f}"
    return "—" if user["acc_v1"] is None or user["acc_oracle"] is None else "— (nothing to gain)"


def _share(value: int | None, reference: int | None) -> str:
    """`value` in bytes and its ratio to `reference`, or a dash when there is none."""
    if value is None:
        return "—"
    return f"{value:,}" if not reference else f"{value:,} ({value / reference:.2f}×)"


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def candidate_lines(user: dict[str, Any]) -> list[str]:
    """One line per candidate recipe the user's cycles tried, with how it fared on the selection split."""
    lines = []
    for key, label in (("candidates", ""), ("candidates_dp", " with DP")):
        for c in user.get(key) or []:
            lines.append(
                f"  candidate {c['recipe']}{label}: {c['status']}, agreement {_number(c['agreement'])}, "
                f"untouched drop {_number(c['untouched_drop'])}, {c['seconds']:.1f} s"
            )
    return lines


def export_line(attempts: list[dict[str, Any]]) -> str:
    """The int8 export's attempts on one line: method, int8 vs float accuracy, accepted or not."""
    return "; ".join(
        f"{a['method']} {_pct(a['int8_acc'])} vs float {_pct(a['float_acc'])}"
        f" {'accepted' if a['accepted'] else 'refused'}"
        for a in attempts
    )


def accuracy_table(result: SimResult) -> Table:
    """Accuracy of every model on each user's world, int8 as deployed (fits 80 columns)."""
    epsilons = sorted({u["dp_epsilon"] for u in result.users})
    table = Table(
        title=f"DiReDi on {result.scenario}: accuracy (%) on each user's world, int8",
        caption="v1: the manufacturer's edge model; device: fine-tuned on the device alone; v2: DiReDi's; "
        "raw: the cloud fed the raw private data; DP: DiReDi with local DP, ε = "
        + ", ".join(f"{e:g}" for e in epsilons)
        + " per report; gap: the share of the gap from v1 to the oracle that v2 closed",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("user", no_wrap=True, max_width=18, overflow="ellipsis")
    for col in ("v1", "device", "v2", "raw", "oracle", "DP", "gap"):
        table.add_column(col, justify="right", no_wrap=True)
    for u in result.users:
        table.add_row(
            u["id"],
            _pct(u["acc_v1"]),
            _pct(u["acc_local"]),
            _pct(u["acc_v2"]),
            _pct(u["acc_raw"]),
            _pct(u["acc_oracle"]),
            _pct(u["acc_dp"]),
            _gap(u),
        )
    return table


def detail_table(result: SimResult) -> Table:
    """Untouched classes, bytes uploaded, cycle time and the gate's verdict per user (fits 80 columns)."""
    table = Table(
        title="Untouched classes, upload size and the gate",
        caption="untouched: accuracy (%) on the classes the user did not change, v1→v2; report B: the "
        "knowledge report's size; weights ×, raw ×: the edge model's weights and the user's raw private "
        "data, in multiples of it; approval: seconds from the report's arrival to the approved model",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("user", no_wrap=True, max_width=14, overflow="ellipsis")
    for col in ("untouched", "report B", "weights ×", "raw ×", "approval", "gate"):
        table.add_column(col, justify="right" if col != "gate" else "left", no_wrap=True)
    for u in result.users:
        seconds = u["knowledge_to_approved_s"]
        knowledge = max(u["knowledge_bytes"], 1)
        table.add_row(
            u["id"],
            f"{_pct(u['untouched_acc_v1'])}→{_pct(u['untouched_acc_v2'])}",
            f"{u['knowledge_bytes']:,}",
            f"{u['edge_weights_bytes'] / knowledge:.0f}",
            f"{u['raw_private_bytes'] / knowledge:.0f}",
            "—" if seconds is None else f"{seconds:.1f} s",
            u["gate"]["outcome"],
        )
    return table


def int8_table(result: SimResult) -> Table:
    """The base edge model, float vs int8."""
    q = result.int8
    table = Table(
        title="Edge model: float32 vs int8 (presumed test split)", box=box.SIMPLE_HEAD, pad_edge=False
    )
    for col in ("", "accuracy %", "weight tensors B", "file B"):
        table.add_column(col, justify="right")
    table.add_row(
        "float32",
        _pct(q.get("float_acc")),
        _share(q.get("float_weight_bytes"), None),
        _share(q.get("float_file_bytes"), None),
    )
    table.add_row(
        "int8",
        _pct(q.get("int8_acc")),
        _share(q.get("int8_weight_bytes"), q.get("float_weight_bytes")),
        _share(q.get("int8_file_bytes"), q.get("float_file_bytes")),
    )
    return table


def print_report(result: SimResult, console: Console) -> None:
    """All tables, then the stage timings."""
    console.print(accuracy_table(result))
    console.print(detail_table(result))
    for u in result.users:
        console.print(f"gate for {u['id']}: {u['gate']['outcome']}: {u['gate']['reason']}")
        if u["gate_dp"] == u["gate"]:  # no v1 to improve, or no report: one reason for both
            console.print(f"gate for {u['id']} with DP: the same")
        else:
            console.print(f"gate for {u['id']} with DP: {u['gate_dp']['outcome']}: {u['gate_dp']['reason']}")
        for line in candidate_lines(u):
            console.print(line, highlight=False, markup=False)
    console.print(int8_table(result))
    if result.int8.get("export"):
        console.print(
            f"int8 export of the base model: {export_line(result.int8['export'])}",
            highlight=False,
            markup=False,
        )
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

    epsilons = ", ".join(f"{e:g}" for e in sorted({u["dp_epsilon"] for u in result.users}))
    series: list[tuple[str, str]] = [
        ("edge v1", "acc_v1"),
        ("device-only", "acc_local"),
        ("DiReDi v2", "acc_v2"),
        ("raw upload", "acc_raw"),
        ("oracle", "acc_oracle"),
        (f"DiReDi + DP (ε = {epsilons})", "acc_dp"),
    ]
    users = result.users
    series = [(label, key) for label, key in series if any(u[key] is not None for u in users)]  # run
    width = 0.8 / len(series)
    measured = [100 * u[key] for u in users for _, key in series if u[key] is not None]
    # The axis starts a little below the lowest bar, so the differences the plot is about show.
    low = max(0.0, 10 * (min(measured, default=50.0) // 10) - 10)
    fig, ax = plt.subplots(figsize=(max(7, 3 * len(users)), 4.8))
    for i, (label, key) in enumerate(series):
        shown = [(j, 100 * u[key]) for j, u in enumerate(users) if u[key] is not None]  # None: not run
        positions: list[Any] = [j + i * width for j, _ in shown]
        bars = ax.bar(positions, [value for _, value in shown], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(users))], [u["id"] for u in users])
    ax.set_ylabel("accuracy on the user's world (%)")
    ax.set_ylim(low, 104)  # room above 100 for the labels
    ax.set_yticks(range(int(low), 101, 5 if 100 - low <= 30 else 10))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"DiReDi on {result.scenario} (int8 models)")
    # Below the axes, never over the bars.
    ax.legend(fontsize="small", ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
