"""What every `diredi` command shares and imports from here, never from `main` (which imports them)."""

import enum
import sys
from typing import Annotated

import typer
from rich.console import Console

# Off a terminal rich would wrap the tables at 80 columns; the sim table needs more.
console = Console(width=None if sys.stdout.isatty() else 150)
err = Console(stderr=True)


class ExitCode(enum.IntEnum):
    """What a `diredi` command's exit status means, for scripts and systemd."""

    OK = 0
    FAILED = 1  # it ran, and what it followed failed (a rollout halted, a job failed)
    ERROR = 2  # what was asked cannot be done: bad input, a refusal, a configuration error
    UNAVAILABLE = 3  # a service it needs did not answer (the API, a database), or a wait timed out


def fail(exc: Exception, code: ExitCode = ExitCode.ERROR) -> typer.Exit:
    """Say what went wrong in one line (however long: for logs and grep); the exit to raise."""
    err.print(f"[red]error:[/red] {exc}", soft_wrap=True, markup=True, highlight=False)
    return typer.Exit(code)


# The option of every long-running service: where it serves its Prometheus metrics.
MetricsPort = Annotated[
    int | None,
    typer.Option(min=0, max=65535, help="Prometheus metrics on 127.0.0.1 (0: none; default from settings)."),
]
