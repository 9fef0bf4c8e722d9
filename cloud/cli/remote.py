"""What the operator's commands over the REST API share: the client, output (a table, or JSON with
`--json`), options, and following a rollout or a job until it ends.

Each command talks to the API through `cloud.client` (DIREDI_API_URL and DIREDI_API_KEY, or a profile:
`--profile`, see `cloud/client.py`) and exits with one of `common.ExitCode`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cloud.cli.common import ExitCode, console, err, fail
from cloud.client import ApiError, FleetClient, load_config
from cloud.exceptions import CloudError

T = TypeVar("T", bound=BaseModel)
Column = tuple[str, Callable[[Any], object]]

JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")]
Limit = Annotated[int, typer.Option(min=1, max=500, help="Rows per page.")]
Offset = Annotated[int, typer.Option(min=0, help="Rows to skip.")]
Reason = Annotated[str, typer.Option(help="Why, for the audit log.", max=1000)]
Profile = Annotated[
    str | None, typer.Option(help="A profile of the profile file (default: DIREDI_PROFILE, or 'default').")
]
Interval = Annotated[float, typer.Option(min=0.2, max=60, help="Seconds between polls.")]
Timeout = Annotated[float, typer.Option(min=1, help="Give up after this many seconds (exit 3).")]


@contextmanager
def api(profile: str | None) -> Iterator[FleetClient]:
    """A client of the configured API; any CloudError (the API refused, or is unreachable, or the
    configuration is wrong) ends the command with one line and its exit code."""
    try:
        with FleetClient(load_config(profile=profile)) as client:
            yield client
    except CloudError as exc:
        unreachable = isinstance(exc, ApiError) and exc.unreachable
        raise fail(exc, ExitCode.UNAVAILABLE if unreachable else ExitCode.ERROR) from None


def uuid_argument(text: str, what: str) -> uuid.UUID:
    """`text` as the UUID that identifies a `what`, or a one-line error."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise fail(CloudError(f"not a {what} id (a UUID): {text!r}"), ExitCode.ERROR) from None


def emit(
    rows: Sequence[BaseModel] | BaseModel, columns: Sequence[Column], *, as_json: bool, title: str = ""
) -> None:
    """`rows` as a table of `columns`, or as JSON."""
    if as_json:
        data = (
            rows.model_dump(mode="json", by_alias=True)
            if isinstance(rows, BaseModel)
            else [r.model_dump(mode="json", by_alias=True) for r in rows]
        )
        console.print_json(json.dumps(data))
        return
    table = Table(title=title or None, title_justify="left")
    for header, _ in columns:
        table.add_column(header)
    for row in [rows] if isinstance(rows, BaseModel) else rows:
        table.add_row(*(cell(get(row)) for _, get in columns))
    console.print(table)


def cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(getattr(value, "value", value))


def paged(title: str, total: int, shown: int, offset: int) -> str:
    return f"{title}: {shown} of {total}" + (f" from {offset}" if offset else "")


def watch(
    read: Callable[[], T],
    *,
    describe: Callable[[T], str],
    done: Callable[[T], bool],
    fraction: Callable[[T], float],
    interval: float,
    timeout: float,
    label: str,
) -> T:
    """Poll `read` until `done`, with a bar on a terminal and a line per change elsewhere."""
    deadline = time.monotonic() + timeout
    last = ""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    ) as bar:  # fmt: skip
        task = bar.add_task(label, total=100)
        while True:
            current = read()
            text = describe(current)
            bar.update(task, completed=round(100 * fraction(current)), description=f"{label}: {text}")
            if not err.is_terminal and text != last:
                err.print(f"{label}: {text}", soft_wrap=True)
            last = text
            if done(current):
                return current
            if time.monotonic() > deadline:
                raise fail(CloudError(f"{label} still {text} after {timeout:g} s"), ExitCode.UNAVAILABLE)
            time.sleep(interval)
