"""Benchmark of DiReDi's gain on a suite of scenarios: gap closed per preference kind, the gate, crashes.

Runs `run_simulation` on every scenario of a directory, or of a generated suite (`--count`, `--seed`),
one process per CPU, and reports the figures DESIGN §7 sets for generated suites. Writes every user's
row and the summary to bench/results/learning_suite.json and a plot of gap_closed per user.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench import harness
from cloud.exceptions import ScenarioError
from cloud.ml.scenario import Scenario, load_scenario, parse_scenario
from cloud.sim.generate import KINDS, generate_scenarios, preference_kind

DEFAULT_COUNT = 10
DEFAULT_SEED = 1
MIN_GAIN_FOR_GAP = 0.02  # as cloud.sim.run: a gap is only measured where the oracle gains this much
DP_LOSS_TOLERATED = 0.01  # a DP user "below v1" loses more than 1.0 point
PREFERENCE_KINDS = [k for k in KINDS if k != "none"]
ALL_WITH_PREFERENCE = "all with a preference"
# DESIGN §7, generated suites
TARGET_MEDIAN_GAP = 0.90
TARGET_P10_GAP = 0.70
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")  # not the 8 of "int8"
KIND_COLOURS = {
    "merge": "tab:blue",
    "swap": "tab:orange",
    "cycle": "tab:green",
    "mix": "tab:red",
    "none": "tab:gray",
}


def _init_worker() -> None:
    """One thread per process: the processes already use every CPU."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.ERROR)  # the converters log chattily at INFO/WARNING


def simulate(scenario_json: str) -> dict[str, Any]:
    """Run one scenario in a worker process; its result as a dict, with its wall time.

    The raw-upload baseline is left out: none of the suite's figures use it, and it costs a training.
    """
    from cloud.sim.run import SimConfig, run_simulation

    started = time.perf_counter()
    result = run_simulation(parse_scenario(scenario_json), SimConfig(raw_upload=False)).as_dict()
    result["wall_s"] = time.perf_counter() - started
    return result


def crash_text(exc: BaseException) -> str:
    """The exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _sub(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(a) - float(b)


def _gap(acc: Any, v1: Any, oracle: Any) -> float | None:
    """(acc − v1) / (oracle − v1), or None where the oracle gains less than MIN_GAIN_FOR_GAP."""
    if acc is None or v1 is None or oracle is None or oracle - v1 < MIN_GAIN_FOR_GAP:
        return None
    return float((acc - v1) / (oracle - v1))


def user_row(scenario: Scenario, user: dict[str, Any]) -> dict[str, Any]:
    """One user's figures; every key of the simulation's row the benchmark does not rename passes through."""
    spec = next((u for u in scenario.users if u.id == user.get("id")), None)
    gate, gate_dp = user.get("gate") or {}, user.get("gate_dp") or {}
    v1, v2, oracle, dp = (user.get(k) for k in ("acc_v1", "acc_v2", "acc_oracle", "acc_dp"))
    row: dict[str, Any] = {
        "scenario": scenario.name,
        "user": user.get("id"),
        "kind": preference_kind(spec.label_map) if spec else None,
        "noise": spec.noise_std if spec else None,
        "devices": spec.devices if spec else user.get("devices"),
        "private_train": spec.private_train if spec else None,
        "acc_v1": v1,
        "acc_v2": v2,
        "acc_oracle": oracle,
        "acc_local": user.get("acc_local"),
        "acc_dp": dp,
        "gap_closed": user["gap_closed"] if "gap_closed" in user else _gap(v2, v1, oracle),
        "gap_closed_dp": _gap(dp, v1, oracle),
        "untouched_change": _sub(user.get("untouched_acc_v2"), user.get("untouched_acc_v1")),
        "change": _sub(v2, v1),
        "dp_change": _sub(dp, v1),
        "gate_outcome": gate.get("outcome"),
        "gate_reason": gate.get("reason"),
        "gate_dp_outcome": gate_dp.get("outcome"),
        "gate_dp_reason": gate_dp.get("reason"),
        "knowledge_to_approved_s": user.get("knowledge_to_approved_s"),
    }
    row.update({k: v for k, v in user.items() if k not in row and k != "id"})
    return row


def _quantile(values: Sequence[float], q: float) -> float | None:
    return float(np.quantile(values, q)) if values else None


def _present(rows: Iterable[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def _kind_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    gaps, gaps_dp = _present(rows, "gap_closed"), _present(rows, "gap_closed_dp")
    untouched = _present(rows, "untouched_change")
    return {
        "n": len(rows),
        "n_gap": len(gaps),
        "gap_min": min(gaps, default=None),
        "gap_p10": _quantile(gaps, 0.1),
        "gap_median": _quantile(gaps, 0.5),
        "n_gap_dp": len(gaps_dp),
        "gap_dp_min": min(gaps_dp, default=None),
        "gap_dp_p10": _quantile(gaps_dp, 0.1),
        "gap_dp_median": _quantile(gaps_dp, 0.5),
        "untouched_change_min": min(untouched, default=None),
        "below_v1": sum(1 for c in _present(rows, "change") if c < 0),
        "dp_below_v1": sum(1 for c in _present(rows, "dp_change") if c < -DP_LOSS_TOLERATED),
    }


def reason_kind(reason: str | None) -> str | None:
    """A gate's reason with its figures replaced by N, so that reasons of one kind are counted together."""
    return None if reason is None else NUMBER.sub("N", reason)


def _gate_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Counts per (outcome, kind of reason), of DiReDi's cycle and of the DP cycle."""
    plain = Counter((r.get("gate_outcome"), reason_kind(r.get("gate_reason"))) for r in rows)
    dp = Counter((r.get("gate_dp_outcome"), reason_kind(r.get("gate_dp_reason"))) for r in rows)
    keys = sorted(set(plain) | set(dp), key=lambda k: (str(k[0]), str(k[1])))
    return [{"outcome": o, "reason": r, "diredi": plain[(o, r)], "dp": dp[(o, r)]} for o, r in keys]


def _chosen(candidates: Any) -> str | None:
    return next((c["recipe"] for c in candidates or [] if c.get("status") == "chosen"), None)


def _recipe_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Approved cycles per recipe that made the model, of DiReDi's cycle and of the DP cycle."""
    plain = Counter(_chosen(r.get("candidates")) for r in rows if r.get("gate_outcome") == "approved")
    dp = Counter(_chosen(r.get("candidates_dp")) for r in rows if r.get("gate_dp_outcome") == "approved")
    return [{"recipe": k, "diredi": plain[k], "dp": dp[k]} for k in sorted(set(plain) | set(dp), key=str)]


def summarize(rows: list[dict[str, Any]], crashes: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The suite's statistics from the per-user rows: per preference kind, the gate, timing, targets."""
    with_pref = [r for r in rows if r.get("kind") not in (None, "none")]
    kinds = {k: _kind_summary([r for r in rows if r.get("kind") == k]) for k in PREFERENCE_KINDS}
    kinds[ALL_WITH_PREFERENCE] = overall = _kind_summary(with_pref)
    no_pref = _present([r for r in rows if r.get("kind") == "none"], "change")
    seconds = _present(rows, "knowledge_to_approved_s")
    median, p10 = overall["gap_median"], overall["gap_p10"]
    return {
        "users": len(rows),
        "kinds": kinds,
        "no_preference": {
            "n": len(no_pref),
            "change_min": min(no_pref, default=None),
            "change_median": _quantile(no_pref, 0.5),
        },
        "gates": _gate_table(rows),
        "approved_by_recipe": _recipe_table(rows),
        "crashes": len(crashes),
        "knowledge_to_approved_s": {
            "n": len(seconds),
            "median": _quantile(seconds, 0.5),
            "p90": _quantile(seconds, 0.9),
        },
        "targets": {
            "no_crash": not crashes,
            f"median_gap_at_least_{TARGET_MEDIAN_GAP}": median is not None and median >= TARGET_MEDIAN_GAP,
            f"p10_gap_at_least_{TARGET_P10_GAP}": p10 is not None and p10 >= TARGET_P10_GAP,
            "no_user_with_a_preference_below_v1": overall["below_v1"] == 0,
        },
    }


def each_scenario(
    task: Callable[..., Any], scenarios: list[Scenario], jobs: int, console: Console, *args: Any
) -> Iterator[tuple[Scenario, Any]]:
    """`task(scenario_json, *args)` for every scenario in `jobs` spawned processes, with a progress bar;
    yields (scenario, result) as each finishes, the exception as its result when it raised."""
    # spawn: the workers import torch themselves rather than inheriting a forked copy of it
    with (
        ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool,
        Progress(
            TextColumn("scenarios"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress,
    ):
        bar = progress.add_task("scenarios", total=len(scenarios))
        futures: dict[Future[Any], Scenario] = {
            pool.submit(task, s.model_dump_json(), *args): s for s in scenarios
        }
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as exc:  # one scenario's failure is a finding; the others go on
                result = exc
            yield futures[future], result
            progress.advance(bar)


def run(
    scenarios: list[Scenario], jobs: int, console: Console
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Simulate every scenario in `jobs` processes; (rows, crashes, per-scenario results without users).

    An exception in a scenario is that scenario's crash. A worker killed outright breaks the pool: the
    scenarios it had not finished are then recorded as crashes too (BrokenProcessPool).
    """
    rows: list[dict[str, Any]] = []
    crashes: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for scenario, result in each_scenario(simulate, scenarios, jobs, console):
        if isinstance(result, BaseException):
            crashes.append({"scenario": scenario.name, "error": crash_text(result)})
        else:
            rows.extend(user_row(scenario, u) for u in result.get("users", []))
            runs.append({k: v for k, v in result.items() if k != "users"})
    order = {s.name: i for i, s in enumerate(scenarios)}
    rows.sort(key=lambda r: (order[r["scenario"]], str(r["user"])))
    runs.sort(key=lambda r: order.get(r.get("scenario", ""), -1))
    crashes.sort(key=lambda c: order[c["scenario"]])
    return rows, crashes, runs


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "—" if value is None else format(value, fmt)


def _points(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}"


def print_summary(summary: dict[str, Any], crashes: Sequence[dict[str, Any]], console: Console) -> None:
    """The benchmark's tables: gap per preference kind, the gate's outcomes, timing, crashes."""
    table = harness.table(
        f"gap_closed per preference kind (targets, all: median ≥ {TARGET_MEDIAN_GAP}, "
        f"p10 ≥ {TARGET_P10_GAP}, none below v1); changes in points",
        (
            "kind", "users", "with gap", "gap min", "p10", "median", "DP gap min", "DP p10", "DP median",
            "untouched min", "below v1", "DP below v1 −1pt",
        ),
        left=1,
    )  # fmt: skip
    for kind, s in summary["kinds"].items():
        table.add_row(
            kind,
            str(s["n"]),
            str(s["n_gap"]),
            _num(s["gap_min"]),
            _num(s["gap_p10"]),
            _num(s["gap_median"]),
            _num(s["gap_dp_min"]),
            _num(s["gap_dp_p10"]),
            _num(s["gap_dp_median"]),
            _points(s["untouched_change_min"]),
            str(s["below_v1"]),
            str(s["dp_below_v1"]),
            end_section=kind == PREFERENCE_KINDS[-1],
        )
    console.print(table)

    gates = harness.table(
        "Gate outcomes (users; figures in the reasons replaced by N)",
        ("outcome", "reason", "DiReDi", "DiReDi+DP"),
        left=2,
    )
    for g in summary["gates"]:
        gates.add_row(str(g["outcome"]), str(g["reason"]), str(g["diredi"]), str(g["dp"]))
    console.print(gates)
    recipes = harness.table(
        "Approved models by the recipe that made them", ("recipe", "DiReDi", "DiReDi+DP"), left=1
    )
    for r in summary.get("approved_by_recipe", []):
        recipes.add_row(str(r["recipe"]), str(r["diredi"]), str(r["dp"]))
    console.print(recipes)

    none = summary["no_preference"]
    console.print(
        f"users without a preference: {none['n']}, change v1→v2 min {_points(none['change_min'])} "
        f"median {_points(none['change_median'])} points (target: lose ≤ 1.0)"
    )
    timing = summary["knowledge_to_approved_s"]
    console.print(
        f"knowledge→approved over {timing['n']} approved cycles: median {_num(timing['median'], '.1f')} s, "
        f"p90 {_num(timing['p90'], '.1f')} s"
    )
    console.print(f"crashes: {len(crashes)}")
    for crash in crashes:
        console.print(f"  {crash['scenario']}: {crash['error']}", highlight=False)
    met = summary["targets"]
    console.print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """gap_closed per user, ascending, bars coloured by preference kind; DP as hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = sorted((r for r in rows if r.get("gap_closed") is not None), key=lambda r: r["gap_closed"])
    n = len(measured)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.32 * n + 2), 5))
    xs = range(n)
    gaps = [r["gap_closed"] for r in measured]
    ax.bar(xs, gaps, color=[KIND_COLOURS.get(str(r.get("kind")), "black") for r in measured], width=0.6)
    dp = [
        (x, r["gap_closed_dp"])
        for x, r in zip(xs, measured, strict=True)
        if r.get("gap_closed_dp") is not None
    ]
    if dp:
        ax.scatter(
            [x + 0.4 for x, _ in dp],
            [g for _, g in dp],
            facecolors="none",
            edgecolors="black",
            s=30,
            zorder=3,
        )
    if n <= 60:  # the value over each bar while it stays readable
        for x, g in zip(xs, gaps, strict=True):
            ax.annotate(f"{g:.2f}", (x, max(g, 0)), ha="center", va="bottom", fontsize=7, rotation=90,
                        xytext=(0, 2), textcoords="offset points")  # fmt: skip
        ax.set_xticks(list(xs), [f"{r['scenario']}/{r['user']}" for r in measured], rotation=90, fontsize=7)
    else:
        ax.set_xticks([])
    ax.axhline(TARGET_MEDIAN_GAP, color="black", linestyle="--", linewidth=1)
    ax.axhline(TARGET_P10_GAP, color="dimgray", linestyle=":", linewidth=1.2)
    low = min([0.0, *gaps, *(g for _, g in dp)])
    high = max([1.0, *gaps, *(g for _, g in dp)])
    ax.set_ylim(low - 0.05, high + 0.15)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    present = [k for k in KINDS if any(r.get("kind") == k for r in measured)]
    handles: list[Any] = [Patch(color=KIND_COLOURS[k], label=k) for k in present]
    handles += [
        Line2D([], [], color="black", linestyle="--", label=f"target median {TARGET_MEDIAN_GAP}"),
        Line2D([], [], color="dimgray", linestyle=":", label=f"target p10 {TARGET_P10_GAP}"),
    ]
    if dp:
        handles.append(
            Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="black", label="with DP")
        )
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylabel("gap closed (v2 − v1) / (oracle − v1)")
    skipped = len(rows) - n
    ax.set_title(f"DiReDi gap closed per user ({n} users; {skipped} with nothing to gain not shown)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _load_dir(directory: Path) -> list[Scenario]:
    paths = sorted(directory.glob("*.json"))
    if not paths:
        raise ScenarioError(f"{directory}: no *.json scenario files")
    return [load_scenario(p) for p in paths]


def main(argv: list[str] | None = None) -> None:
    """Run the suite, print the tables, write JSON and the plot."""
    parser = harness.parser(__doc__, "learning_suite")
    parser.add_argument("--scenarios", type=Path, help="a directory of scenario files (instead of a suite)")
    parser.add_argument("--count", type=int, help=f"generated scenarios (default {DEFAULT_COUNT})")
    parser.add_argument("--seed", type=int, help=f"the generated suite's seed (default {DEFAULT_SEED})")
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist-5k"], help="a suite's data")
    parser.add_argument("--jobs", type=int, default=harness.cpus(), help="worker processes")
    parser.add_argument("--plot", type=Path, default=harness.RESULTS / "learning_suite.png")
    args = parser.parse_args(argv)
    if args.scenarios and (args.count is not None or args.seed is not None):
        parser.error("--scenarios or --count/--seed, not both")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    count = DEFAULT_COUNT if args.count is None else args.count
    seed = DEFAULT_SEED if args.seed is None else args.seed
    if not args.scenarios and not (1 <= count <= 1000 and seed >= 0):
        parser.error("--count must be 1..1000 and --seed not negative")
    try:
        scenarios = (
            _load_dir(args.scenarios) if args.scenarios else generate_scenarios(count, seed, args.dataset)
        )
    except ScenarioError as exc:
        parser.error(str(exc))

    console = Console(width=160)
    started = time.perf_counter()
    rows, crashes, runs = run(scenarios, args.jobs, console)
    wall = time.perf_counter() - started
    summary = summarize(rows, crashes)
    print_summary(summary, crashes, console)
    report = {
        **harness.machine_keys(),
        "jobs": args.jobs,
        "generator": None if args.scenarios else {"count": count, "seed": seed, "dataset": args.dataset},
        "scenarios_dir": str(args.scenarios) if args.scenarios else None,
        "wall_s": wall,
        "summary": summary,
        "crashes": crashes,
        "rows": rows,
        "runs": runs,
    }
    console.print(f"{len(scenarios)} scenarios, {len(rows)} users in {wall:.0f} s with {args.jobs} processes")
    harness.write_results(report, args.out, console)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    write_plot(rows, args.plot)
    console.print(f"plotted to {args.plot}")


if __name__ == "__main__":
    main()
