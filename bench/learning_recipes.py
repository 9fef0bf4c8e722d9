"""Benchmark of the RD cycle's recipes, each alone, on a suite's users: how the search's recipes are chosen.

The learning suite measures the loop as shipped (the search picks one recipe per cycle); this bench
measures every recipe on its own. For each scenario it trains the base line once, and for each user
with a preference it sends the device's knowledge (`extract_knowledge`, no DP) through `rd_cycle` with
a search of that one recipe: the gate's verdict on the validation split, the user's world accuracy
before and after, and the change on the classes the user's map leaves alone. A recipe that does not
apply to a user's knowledge (relabelling needs a permutation) is recorded as such. Run it on a
development suite only (docs/learning-loop.md). Writes bench/results/learning_recipes.json.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from bench import harness
from bench.learning_suite import _load_dir, crash_text, each_scenario
from cloud.exceptions import ScenarioError
from cloud.ml.recipes import HEAD, LONGER, PLAIN, REKD, RELABEL, RELABEL_REKD, Recipe
from cloud.ml.scenario import Scenario, parse_scenario
from cloud.sim.generate import generate_scenarios, preference_kind

RECIPES: dict[str, Recipe] = {r.name: r for r in (RELABEL, REKD, RELABEL_REKD, PLAIN, LONGER, HEAD)}
DEFAULT_RECIPES = (RELABEL.name, REKD.name, RELABEL_REKD.name)


def recipe_runs(scenario_json: str, names: list[str]) -> list[dict[str, Any]]:
    """Every named recipe alone on every user with a preference of one scenario (in a worker process)."""
    from cloud.ml.cycle import rd_cycle
    from cloud.ml.data import build_scenario_data
    from cloud.ml.families import NetSpec
    from cloud.ml.line import TrainingPlan, train_line
    from cloud.ml.rd_update import RDConfig, combine_reports, parse_reports
    from cloud.ml.recipes import SearchConfig, applies
    from device_firmware_py.rd import extract_knowledge

    scenario = parse_scenario(scenario_json)
    data = build_scenario_data(scenario)
    plan = TrainingPlan(seed=scenario.seed)
    base = train_line(data.train, NetSpec(), plan, line="base", val=data.val)
    v1 = base.artifact.load()
    config = RDConfig()
    rows = []
    for user in data.users:
        spec = user.spec
        if not spec.label_map:
            continue
        payloads = [
            extract_knowledge(
                v1, pool.x, pool.y, device_id=f"{spec.id}-d{k}", seed=scenario.seed + k
            ).to_bytes()
            for k, pool in enumerate(user.device_train)
        ]
        knowledge = combine_reports(parse_reports(payloads), base.artifact.manifest, config)
        world = user.world_test
        untouched = ~np.isin(world.y, sorted({*spec.label_map, *spec.label_map.values()}))
        before = v1.predict(world.x)
        for name in names:
            row: dict[str, Any] = {
                "scenario": scenario.name,
                "user": spec.id,
                "kind": preference_kind(spec.label_map),
                "recipe": name,
                "acc_v1": float((before == world.y).mean()),
            }
            if not applies(RECIPES[name], knowledge):
                rows.append({**row, "outcome": "not applicable"})
                continue
            started = time.perf_counter()
            result = rd_cycle(
                base, payloads, data.train, data.val, plan, config, line=spec.id,
                search=SearchConfig(recipes=(RECIPES[name],)),
            )  # fmt: skip
            after = result.candidate.artifact.load().predict(world.x) if result.candidate else before
            verdict = result.verdict
            rows.append(
                {
                    **row,
                    "outcome": result.outcome,
                    "reason": result.reason,
                    "agreement": verdict.agreement if verdict else None,
                    "changed_samples": verdict.changed_samples if verdict else None,
                    "acc_candidate": float((after == world.y).mean()),
                    "untouched_change": float(
                        (after[untouched] == world.y[untouched]).mean()
                        - (before[untouched] == world.y[untouched]).mean()
                    )
                    if untouched.any()
                    else None,
                    "seconds": time.perf_counter() - started,
                }
            )
    return rows


def summarize(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per recipe: its outcomes and what its candidates did to the users' world accuracy."""
    out = []
    for name in names:
        mine = [r for r in rows if r["recipe"] == name and r["outcome"] != "not applicable"]
        reasons = [str(r.get("reason", "")) for r in mine if r["outcome"] == "rejected"]
        gains = [r["acc_candidate"] - r["acc_v1"] for r in mine if "acc_candidate" in r]
        untouched = [r["untouched_change"] for r in mine if r.get("untouched_change") is not None]
        out.append(
            {
                "recipe": name,
                "users": len(mine),
                "not_applicable": sum(r["recipe"] == name and r["outcome"] == "not applicable" for r in rows),
                "approved": sum(r["outcome"] == "approved" for r in mine),
                "refused_agreement": sum("agrees with" in r for r in reasons),
                "refused_untouched": sum("untouched-class" in r for r in reasons),
                "no_op": sum(r["outcome"] == "no-op" for r in mine),
                "candidate_gain_median": statistics.median(gains) if gains else None,
                "untouched_change_min": min(untouched) if untouched else None,
                "seconds_median": statistics.median(r["seconds"] for r in mine) if mine else None,
            }
        )
    return out


def _cell(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def print_summary(summary: list[dict[str, Any]], console: Console) -> None:
    table = harness.table(
        "Each recipe alone (candidates on the users' world test sets)",
        (
            "recipe", "users", "n/a", "approved", "refused: agreement", "refused: untouched", "no-op",
            "gain median", "untouched min", "s median",
        ),
        left=1,
    )  # fmt: skip
    for s in summary:
        table.add_row(
            s["recipe"],
            str(s["users"]),
            str(s["not_applicable"]),
            str(s["approved"]),
            str(s["refused_agreement"]),
            str(s["refused_untouched"]),
            str(s["no_op"]),
            _cell(s["candidate_gain_median"], "+.3f"),
            _cell(s["untouched_change_min"], "+.3f"),
            _cell(s["seconds_median"], ".1f"),
        )
    console.print(table)


def run(
    scenarios: list[Scenario], names: list[str], jobs: int, console: Console
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every scenario in `jobs` processes; (rows, crashes)."""
    rows: list[dict[str, Any]] = []
    crashes: list[dict[str, Any]] = []
    for scenario, result in each_scenario(recipe_runs, scenarios, jobs, console, names):
        if isinstance(result, BaseException):
            crashes.append({"scenario": scenario.name, "error": crash_text(result)})
        else:
            rows.extend(result)
    rows.sort(key=lambda r: (r["scenario"], r["user"], names.index(r["recipe"])))
    return rows, crashes


def main(argv: list[str] | None = None) -> None:
    """Run the recipes, print the table, write JSON."""
    parser = harness.parser(__doc__, "learning_recipes")
    parser.add_argument("--scenarios", type=Path, help="a directory of scenario files (instead of a suite)")
    parser.add_argument("--count", type=int, default=8, help="generated scenarios (default 8)")
    parser.add_argument("--seed", type=int, default=100, help="the generated suite's seed (default 100, dev)")
    parser.add_argument(
        "--recipes",
        default=",".join(DEFAULT_RECIPES),
        help=f"comma-separated, of: {', '.join(RECIPES)} (default: the search's)",
    )
    parser.add_argument("--jobs", type=int, default=harness.cpus(), help="worker processes")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        parser.error(f"unknown recipe(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(RECIPES)}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if not (1 <= args.count <= 1000 and args.seed >= 0):
        parser.error("--count must be 1..1000 and --seed not negative")
    try:
        scenarios = _load_dir(args.scenarios) if args.scenarios else generate_scenarios(args.count, args.seed)
    except ScenarioError as exc:
        parser.error(str(exc))

    console = Console(width=160)
    started = time.perf_counter()
    rows, crashes = run(scenarios, names, args.jobs, console)
    summary = summarize(rows, names)
    print_summary(summary, console)
    for crash in crashes:
        console.print(f"[red]crash[/red] {crash['scenario']}: {crash['error']}")
    report = {
        **harness.machine_keys(),
        "jobs": args.jobs,
        "generator": None if args.scenarios else {"count": args.count, "seed": args.seed},
        "scenarios_dir": str(args.scenarios) if args.scenarios else None,
        "wall_s": time.perf_counter() - started,
        "summary": summary,
        "crashes": crashes,
        "rows": rows,
    }
    harness.write_results(report, args.out, console)


if __name__ == "__main__":
    main()
