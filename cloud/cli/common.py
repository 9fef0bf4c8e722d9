"""What every `diredi` command shares and imports from here, never from `main` (which imports them)."""

import sys
from typing import Annotated

import typer
from rich.console import Console

# Off a terminal rich would wrap the tables at 80 columns; the sim table needs more.
console = Console(width=None if sys.stdout.isatty() else 150)

# The option of every long-running service: where it serves its Prometheus metrics.
MetricsPort = Annotated[
    int | None,
    typer.Option(min=0, max=65535, help="Prometheus metrics on 127.0.0.1 (0: none; default from settings)."),
]
