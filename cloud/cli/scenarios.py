"""`diredi scenarios`: generated scenario suites for the simulation and the learning-suite benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)

scenarios_app = typer.Typer(help="Scenario files for `diredi sim` and bench/learning_suite.py.")

MAX_COUNT = 1000


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(2)


@scenarios_app.command("generate")
def generate(
    count: Annotated[int, typer.Option(help=f"How many scenarios (1–{MAX_COUNT}).")],
    seed: Annotated[int, typer.Option(help="The suite's seed; scenario i depends only on (seed, i).")],
    out: Annotated[Path, typer.Option(help="Directory to write <name>.json files into (created).")],
    dataset: Annotated[str, typer.Option(help="The built-in data: digits or mnist-5k.")] = "digits",
) -> None:
    """Write COUNT generated scenarios, named gen-s<seed>-<i>, as JSON files into OUT."""
    from cloud.sim.generate import generate_scenarios

    if not 1 <= count <= MAX_COUNT:
        raise _fail(f"--count must be between 1 and {MAX_COUNT}, got {count}")
    if seed < 0:
        raise _fail(f"--seed must not be negative, got {seed}")
    if dataset not in ("digits", "mnist-5k"):
        raise _fail(f"--dataset must be digits or mnist-5k, got {dataset!r}")
    if out.exists() and not out.is_dir():
        raise _fail(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail(f"--out {out}: cannot create: {exc.strerror}") from None
    scenarios = generate_scenarios(count, seed, dataset)
    try:
        for scenario in scenarios:
            text = json.dumps(scenario.model_dump(mode="json"), indent=2) + "\n"
            (out / f"{scenario.name}.json").write_text(text)
    except OSError as exc:
        raise _fail(f"--out {out}: cannot write: {exc.strerror}") from None
    users = sum(len(s.users) for s in scenarios)
    console.print(f"wrote {count} scenarios ({users} users) to {out}")
