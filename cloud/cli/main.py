"""`diredi`: the operator's command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from cloud.cli.common import console, fail, infrastructure_failure
from cloud.exceptions import CloudError
from device_firmware_py.exceptions import DeviceError
from wire import ContractError

app = typer.Typer(
    help="DiReDi fleet: keep edge models fitting their users without their data leaving the device."
)


def _version(shown: bool) -> None:
    if shown:
        from importlib.metadata import version

        console.print(f"diredi {version('diredi')}")
        raise typer.Exit()


@app.callback()
def _main(
    _: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """DiReDi fleet."""


PLOT_SUFFIXES = {".png", ".svg", ".pdf"}


def _check_output(path: Path, suffixes: set[str]) -> None:
    """Refuse an output path before minutes of work rather than after."""
    if path.suffix.lower() not in suffixes:
        console.print(f"[red]error:[/red] {path}: the file name must end in one of {sorted(suffixes)}")
        raise typer.Exit(2)
    if not path.parent.is_dir():
        console.print(f"[red]error:[/red] {path}: directory {path.parent} does not exist")
        raise typer.Exit(2)


@app.command()
def sim(
    scenario: Annotated[Path, typer.Option(help="Scenario JSON file (DESIGN §3 format).")],
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG plot of the accuracies here.")] = None,
    raw_upload: Annotated[
        bool,
        typer.Option(
            "--raw-upload/--no-raw-upload",
            help="Train the raw-upload baseline (the privacy-giving reference; about half the run's time).",
        ),
    ] = True,
) -> None:
    """Run the DiReDi learning loop in-process for every user of a scenario and print the table."""
    logging.getLogger().setLevel(logging.ERROR)  # the converters log chattily at INFO/WARNING
    for path, suffixes in ((out, {".json"}), (plot, PLOT_SUFFIXES)):
        if path is not None:
            _check_output(path, suffixes)
    from cloud.cli.progress import stage_bars
    from cloud.ml.scenario import load_simulation
    from cloud.sim.report import print_report, write_json, write_plot
    from cloud.sim.run import SimConfig, run_simulation

    try:
        spec = load_simulation(scenario)
        with stage_bars(console) as progress:
            result = run_simulation(spec, SimConfig(raw_upload=raw_upload), progress=progress)
    except (CloudError, DeviceError, ContractError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    print_report(result, console)
    if out:
        write_json(result, out)
        console.print(f"results written to {out}")
    if plot:
        write_plot(result, plot)
        console.print(f"plot written to {plot}")


def _register_ops() -> None:
    from cloud.cli import ops

    app.add_typer(ops.db_app, name="db")
    app.add_typer(ops.apikey_app, name="apikey")
    app.add_typer(ops.keys_app, name="keys")
    app.add_typer(ops.telemetry_app, name="telemetry")
    app.add_typer(ops.line_app, name="line")
    app.command("api")(ops.api)
    from cloud.cli.ingest import ingest

    app.command("ingest")(ingest)
    from cloud.cli.worker import worker

    app.command("worker")(worker)
    from cloud.cli.up import up

    app.command("up")(up)
    from cloud.cli.demo import demo

    app.command("demo")(demo)
    from cloud.cli.scenarios import scenarios_app

    app.add_typer(scenarios_app, name="scenarios")
    from cloud.cli.front import front_app

    app.add_typer(front_app, name="front")
    from cloud.cli.broker import broker_app

    app.add_typer(broker_app, name="broker")
    from cloud.cli.devices import devices_app, telemetry_show
    from cloud.cli.models import models_app
    from cloud.cli.rollouts import jobs_app, rollouts_app

    app.add_typer(devices_app, name="devices")
    app.add_typer(models_app, name="models")
    app.add_typer(rollouts_app, name="rollouts")
    app.add_typer(jobs_app, name="jobs")
    from cloud.cli.enrolments import claims_app, enrolments_app

    app.add_typer(claims_app, name="claims")
    app.add_typer(enrolments_app, name="enrolments")
    ops.telemetry_app.command("show")(telemetry_show)


_register_ops()


def main() -> None:
    """The `diredi` entry point: the app, with what its dependencies' failures raise said in one line."""
    try:
        app()
    except Exception as exc:
        described = infrastructure_failure(exc)
        if described is None:
            raise
        message, code = described
        fail(CloudError(message), code)  # says it; the exit it returns is click's, out of its reach here
        sys.exit(code)
