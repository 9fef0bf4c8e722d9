"""`diredi up`: the whole system on one machine, until Ctrl-C or SIGTERM (cloud/localsystem.py)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cloud.cli.common import fail, load_settings
from cloud.exceptions import ChildExited, LocalSystemConfigError, LocalSystemError
from cloud.localsystem import LocalSystem

# Off a terminal (a log, a test) rich would wrap at 80 columns, splitting URLs and paths.
console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200, highlight=False)
WATCH_SECONDS = 0.5
LOG_NAME = "up.log"  # this process's own log: the embedded broker's, and the system's


def up(
    api_port: Annotated[int, typer.Option(min=1, max=65535, help="The API's port.")] = 8000,
    mqtt_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="The embedded broker's port (default 1883)."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="IPv4 address the API and the embedded broker listen on.")
    ] = "127.0.0.1",
    worker: Annotated[
        bool, typer.Option("--worker/--no-worker", help="Run the pipeline's Celery worker and beat.")
    ] = True,
) -> None:
    """Run everything on this machine: registry, MQTT broker, ingest, worker and API.

    With no configuration: SQLite and the queue in DIREDI_DATA_DIR and the embedded broker. With
    DIREDI_MQTT_URL and DIREDI_MQTT_ADMIN_URL (a mosquitto), DIREDI_DATABASE_URL and DIREDI_REDIS_URL,
    those are used instead. Ctrl-C or SIGTERM stops everything."""
    settings = load_settings()
    try:
        system = LocalSystem(
            settings,
            host=host,
            api_port=api_port,
            mqtt_port=1883 if mqtt_port is None else mqtt_port,
            worker=worker,
            on_ready=_print_ready,
        )
        if mqtt_port is not None and not system.embedded:
            raise LocalSystemConfigError(
                "--mqtt-port is the embedded broker's; the broker is configured (DIREDI_MQTT_URL)"
            )
    except LocalSystemConfigError as exc:
        raise fail(exc) from None
    try:
        _log_to(system.log_dir / LOG_NAME)
    except OSError as exc:
        raise fail(LocalSystemConfigError(f"log directory {system.log_dir}: {exc.strerror}")) from None
    _stop_on_signals()
    try:
        try:
            with console.status("starting…"):
                system.start()
        except LocalSystemConfigError as exc:
            raise fail(exc) from None  # nothing was started
        except ChildExited as exc:
            raise _died(exc) from None
        except LocalSystemError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        _print_summary(system)
        while True:
            system.check()
            time.sleep(WATCH_SECONDS)
    except KeyboardInterrupt:
        console.print("stopping…")
        killed = system.stop()
        if killed:
            console.print(f"[yellow]killed after {system.stop_timeout:g} s:[/yellow] {', '.join(killed)}")
        console.print("stopped")
    except (ChildExited, LocalSystemError) as exc:
        system.stop()
        if isinstance(exc, ChildExited):
            raise _died(exc) from None
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None


def _log_to(path: Path) -> None:
    """This process's logging into an owner-only file beside the children's logs."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    logging.basicConfig(
        filename=path, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)  # amqtt's state machine, every step


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt once; later ones are ignored while everything stops."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def _print_ready(part: str, detail: str) -> None:
    console.print(f"[green]✓[/green] {part:<9} {detail}", soft_wrap=True)


def _died(exc: ChildExited) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    err.print("everything else was stopped")
    return typer.Exit(1)


def _print_summary(system: LocalSystem) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_row("API", system.api_url, f"docs {system.docs_url}")
    others = [f"{name} {system.metrics_url(port)}" for name, port in system.metrics_ports.items()]
    table.add_row("metrics", f"api {system.api_url}/metrics (a viewer key)", " · ".join(others))
    elsewhere = " (from other machines: this one's address)" if system.host != system.local_host else ""
    table.add_row(
        "devices",
        system.broker_target.url() + elsewhere,
        "user and client id: the device id; password: its secret",
    )
    table.add_row("data", str(system.data_dir))
    logs = [LOG_NAME, *(path.name for path in system.log_paths.values())]
    table.add_row("logs", str(system.log_dir), ", ".join(logs))
    console.print(table)
    console.print(
        "DiReDi is up. An API key: [bold]diredi apikey create --role admin[/bold] (same settings)."
        " Ctrl-C stops everything.",
        soft_wrap=True,
    )
