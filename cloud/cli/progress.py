"""Progress for long CLI work, fed by the ML's `(stage, done, total)` callback: a bar per stage on a
terminal, log lines elsewhere (a CI log, a pipe, systemd's journal)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:  # the type only: importing cloud.ml loads torch
    from cloud.ml.line import StageProgress


LOG_EVERY_S = 10.0


@contextmanager
def stage_bars(console: Console, *, label_width: int = 40) -> Iterator[StageProgress]:
    """A progress callback that draws a bar per stage while the block runs, and clears them after;
    off a terminal, one line when a stage starts and ends and at most one every LOG_EVERY_S between."""
    if not console.is_terminal:
        yield _log_lines(Console(stderr=True, soft_wrap=True))
        return
    with Progress(
        TextColumn(f"{{task.description:<{label_width}}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bars:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield progress


def _log_lines(log: Console) -> StageProgress:
    started = time.monotonic()
    last: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage in last and done < total and now - last[stage] < LOG_EVERY_S:
            return
        last[stage] = now
        log.print(f"[{now - started:6.1f} s] {stage}: {done}/{total}", highlight=False)

    return progress
