"""Progress bars for long CLI work: one bar per stage, fed by the ML's `(stage, done, total)` callback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:  # the type only: importing cloud.ml loads torch
    from cloud.ml.cycle import StageProgress


@contextmanager
def stage_bars(console: Console, *, label_width: int = 40) -> Iterator[StageProgress]:
    """A progress callback that draws a bar per stage while the block runs, and clears them after."""
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
