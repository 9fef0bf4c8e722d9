"""What every `diredi` command shares and imports from here, never from `main` (which imports them)."""

import enum
import errno
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

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
    err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


# The option of every long-running service: where it serves its Prometheus metrics.
MetricsPort = Annotated[
    int | None,
    typer.Option(
        min=0, max=65535, help="Prometheus metrics on DIREDI_METRICS_HOST (0: none; default from settings)."
    ),
]


def infrastructure_failure(exc: BaseException) -> tuple[str, ExitCode] | None:
    """One line for an error of something a command depends on (the registry's database, Redis, a
    port), and its exit code; None for any other error (a bug: its traceback is worth seeing)."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, OperationalError | InterfaceError):
        return f"the registry's database is unreachable: {_first_line(exc.orig)}", ExitCode.UNAVAILABLE
    if isinstance(exc, DBAPIError):
        return f"the registry's database refused the command: {_first_line(exc.orig)}", ExitCode.ERROR
    from redis.exceptions import ConnectionError as RedisDown  # redis comes with celery[redis]

    if isinstance(exc, RedisDown):
        return f"Redis is unreachable: {_first_line(exc)}", ExitCode.UNAVAILABLE
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"a port it needs is in use: {exc.strerror}", ExitCode.ERROR
    if isinstance(exc, ConnectionError | TimeoutError):
        return f"a service did not answer: {_first_line(exc)}", ExitCode.UNAVAILABLE
    return None


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip()
    if text.startswith("connection failed: "):  # psycopg's prefix, said by the message already
        text = text.removeprefix("connection failed: ")
    return text.splitlines()[0] if text else type(exc).__name__
