"""Write the dashboards' JSON from their modules: `python -m dashboards.build [--check]`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from dashboards.accuracy import model_accuracy
from dashboards.device import device_telemetry
from dashboards.fleet import fleet_overview
from dashboards.health import service_health
from dashboards.knowledge import knowledge_and_jobs

JSON_DIR = Path(__file__).resolve().parent / "json"
DASHBOARDS = {
    "fleet-overview.json": fleet_overview,
    "knowledge-jobs.json": knowledge_and_jobs,
    "model-accuracy.json": model_accuracy,
    "device-telemetry.json": device_telemetry,
    "service-health.json": service_health,
}


def _panels(panels: list[dm.Panel | dm.RowPanel]) -> Iterator[dm.Panel | dm.RowPanel]:
    for panel in panels:
        yield panel
        if isinstance(panel, dm.RowPanel):
            yield from panel.panels


def render(name: str) -> str:
    """The JSON text of one dashboard, with panel ids numbered in layout order (rows included)."""
    model = DASHBOARDS[name]().build()
    for number, panel in enumerate(_panels(model.panels or []), start=1):
        panel.id_val = number
    return json.dumps(model, cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def stale(directory: Path = JSON_DIR) -> list[str]:
    """The dashboards whose file differs from what the builder produces now."""
    return [
        n
        for n in DASHBOARDS
        if not (directory / n).is_file() or (directory / n).read_text(encoding="utf-8") != render(n)
    ]


def main(argv: list[str] | None = None) -> int:
    """Write every dashboard, or with --check only report (exit 1) the ones that are out of date."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a committed JSON file is out of date")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale()
        for name in out_of_date:
            sys.stderr.write(f"{JSON_DIR / name} is out of date: run python -m dashboards.build\n")
        return 1 if out_of_date else 0
    JSON_DIR.mkdir(parents=True, exist_ok=True)
    for name in DASHBOARDS:
        (JSON_DIR / name).write_text(render(name), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
