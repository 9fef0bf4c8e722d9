"""What every `diredi` command shares and imports from here, never from `main` (which imports them)."""

from __future__ import annotations

import enum
import errno
import re
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cloud.exceptions import CloudError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from cloud.settings import Settings

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


def load_settings() -> Settings:
    """The settings (environment, then the defaults), or one line naming the first bad one."""
    from pydantic import ValidationError

    from cloud.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        why = first["msg"].removeprefix("Value error, ")
        raise fail(CloudError(f"invalid setting {field} (DIREDI_{field.upper()}): {why}")) from None


def migrated_engine(settings: Settings) -> Engine:
    """An engine on the registry, which must be at the newest revision (services refuse to start on an
    older schema)."""
    from cloud.registry import migrate
    from cloud.registry.db import make_engine

    try:
        engine = make_engine(settings.resolved_database_url)
    except CloudError as exc:  # an SQLite registry that others can read
        raise fail(exc) from None
    if migrate.current(engine) != migrate.head():
        engine.dispose()
        raise fail(CloudError("the registry is not migrated to the newest revision: run `diredi db upgrade`"))
    return engine


def check_name(name: str) -> None:
    """A service's name (its broker session or Celery node): letters, digits, - and _, at most 40."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
        raise fail(CloudError("--name may hold only letters, digits, - and _ (at most 40)"))


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
