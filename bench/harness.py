"""What every benchmark shares: its command line, the PostgreSQL it runs on, the machine, its results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
POSTGRES_ENV = "DIREDI_TEST_POSTGRES_URL"


def parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """A benchmark's parser: the first line of its docstring as description, and `--out PATH`."""
    made = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    made.add_argument(
        "--out",
        type=Path,
        default=RESULTS / f"{name}.json",
        metavar="PATH",
        help=f"where the JSON results go (default: bench/results/{name}.json)",
    )
    return made


def postgres_url() -> str:
    """The PostgreSQL server the benchmark makes its scratch databases on; exits saying how to get one."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        raise SystemExit(f"set {POSTGRES_ENV} (scripts/services.sh postgres prints it)")
    return url


def cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def commit() -> str | None:
    """The checkout's git commit, or None where git is missing or cannot say."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603
            [git, "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = done.stdout.strip()
    return sha if done.returncode == 0 and sha else None


def machine() -> dict[str, Any]:
    """What the figures were measured on: usable CPUs, Python, the platform and the commit."""
    return {
        "cpus": cpus(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit(),
    }


def machine_keys() -> dict[str, Any]:
    """A report's `machine`, with its `cpus` and `python` at the report's top too (the docs quote them)."""
    found = machine()
    return {"cpus": found["cpus"], "python": found["python"], "machine": found}


def table(title: str, columns: Iterable[str], *, left: int = 0) -> Table:
    """A results table: the first `left` columns (labels) left-aligned, the figures after them right."""
    made = Table(title=title)
    for n, column in enumerate(columns):
        made.add_column(column, justify="left" if n < left else "right")
    return made


def write_results(report: Mapping[str, Any], out: Path, console: Console) -> None:
    """Write the report to `out` as indented JSON (other values as text) and say where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    console.print(f"written to {out}")
