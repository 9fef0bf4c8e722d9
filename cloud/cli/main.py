"""`diredi`: the operator's command line."""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperGroup

from cloud.cli.common import console, fail, infrastructure_failure
from cloud.exceptions import CloudError

if TYPE_CHECKING:
    from typer import _click as click  # typer's own click, whose types its groups are declared with

# Every other command's module is imported when that command runs (and when `--help` lists them all):
# a command starts with what it uses, so `diredi broker init` loads neither the API's schemas nor the
# registry's tables it does not need. Name → "module:attribute", a Typer app or a command function;
# `--help` lists them in this order, after `sim`.
COMMANDS = {
    "api": "cloud.cli.ops:api",
    "ingest": "cloud.cli.ingest:ingest",
    "worker": "cloud.cli.worker:worker",
    "up": "cloud.cli.up:up",
    "demo": "cloud.cli.demo:demo",
    "db": "cloud.cli.ops:db_app",
    "apikey": "cloud.cli.ops:apikey_app",
    "keys": "cloud.cli.ops:keys_app",
    "telemetry": "cloud.cli.telemetry:telemetry_app",
    "line": "cloud.cli.ops:line_app",
    "scenarios": "cloud.cli.scenarios:scenarios_app",
    "front": "cloud.cli.front:front_app",
    "broker": "cloud.cli.broker:broker_app",
    "devices": "cloud.cli.devices:devices_app",
    "models": "cloud.cli.models:models_app",
    "rollouts": "cloud.cli.rollouts:rollouts_app",
    "jobs": "cloud.cli.rollouts:jobs_app",
    "claims": "cloud.cli.enrolments:claims_app",
    "enrolments": "cloud.cli.enrolments:enrolments_app",
}


@functools.cache
def _load(name: str) -> click.Command:
    """The click command of `COMMANDS[name]`, its module imported now."""
    module, attribute = COMMANDS[name].split(":")
    target = getattr(importlib.import_module(module), attribute)
    if isinstance(target, typer.Typer):
        command: click.Command = typer.main.get_group(target)
    else:  # a command function
        target_app = typer.Typer(add_completion=False)
        target_app.command(name)(target)
        command = typer.main.get_command(target_app)
    command.name = name
    return command


class _LazyGroup(TyperGroup):
    """`diredi`'s own commands, then those of COMMANDS, each loaded when asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *COMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return _load(cmd_name) if cmd_name in COMMANDS else super().get_command(ctx, cmd_name)


app = typer.Typer(
    cls=_LazyGroup,
    help="DiReDi fleet: keep edge models fitting their users without their data leaving the device.",
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
    from device_firmware_py.exceptions import DeviceError
    from wire import ContractError

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
