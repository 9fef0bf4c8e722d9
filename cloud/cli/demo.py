"""`diredi demo`: the main job — the whole system plus one device daemon per scenario user, running the
DiReDi loop end to end; prints what each device measured before and after, and the new models' lineage."""

from __future__ import annotations

import json
import logging
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from cloud.cli.common import console, fail, load_settings
from cloud.exceptions import CloudError

if TYPE_CHECKING:  # the type only: cloud.demo loads the ML data code
    from cloud.demo import DemoResult


def demo(
    scenario: Annotated[Path, typer.Option(help="Scenario JSON: one device per user.")] = Path(
        "scenarios/digits-two-users.json"
    ),
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where the system keeps its state (new or empty; default: a new temp dir)."),
    ] = None,
    api_port: Annotated[int, typer.Option(min=0, max=65535, help="API port (0: a free one).")] = 0,
    mqtt_port: Annotated[
        int, typer.Option(min=0, max=65535, help="Embedded broker port (0: a free one).")
    ] = 0,
    keep: Annotated[bool, typer.Option(help="Keep the system running after the loop, until Ctrl-C.")] = False,
) -> None:
    """Run the whole DiReDi loop on one machine: KD → dispatch → private feedback → RD → knowledge →
    pipeline → gate → rollout → install, with real device daemons, and print what they measured."""
    from cloud.children import free_ports
    from cloud.demo import STEPS, demo_settings, run_demo
    from cloud.exceptions import DemoError
    from cloud.ml.scenario import load_simulation

    logging.getLogger().setLevel(logging.ERROR)  # the converters log chattily at INFO/WARNING
    try:
        users = [u.id for u in load_simulation(scenario).users]
    except CloudError as exc:
        raise fail(exc) from None
    if out is not None and (out.suffix != ".json" or not out.parent.is_dir()):
        raise fail(CloudError(f"{out}: must be a .json file in an existing directory"))
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="diredi-demo-"))
    elif data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise fail(CloudError(f"{data_dir}: the demo needs a new or empty directory"))
    free = iter(free_ports(2))
    api_port, mqtt_port = api_port or next(free), mqtt_port or next(free)
    settings = demo_settings(data_dir, load_settings())
    console.print(f"[bold]DiReDi demo[/bold] on {scenario} ({len(users)} users); state in {data_dir}")

    def keep_running(system: object) -> None:
        console.print("The loop is done; the system keeps running. Ctrl-C to stop.")
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()

    with Progress(
        TextColumn("{task.fields[user]:<8}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
    ) as bars:
        tasks: dict[str, TaskID] = {u: bars.add_task("waiting", total=STEPS, user=u) for u in users}

        said: dict[str, tuple[int, float]] = {}

        def progress(user: str, step: int, text: str) -> None:
            bars.update(tasks[user], completed=step, description=text)
            if not console.is_terminal:  # no live bars in a log: a line per milestone, or every 15 s
                last_step, last_at = said.get(user, (-1, 0.0))
                if step != last_step or time.monotonic() - last_at > 15:
                    said[user] = (step, time.monotonic())
                    console.print(f"{user:<8} {step}/{STEPS} {text}")

        try:
            result = run_demo(
                settings,
                scenario,
                api_port=api_port,
                mqtt_port=mqtt_port,
                progress=progress,
                on_ready=keep_running if keep else None,
            )
        except (DemoError, CloudError) as exc:
            raise fail(exc) from None
    _print(console, result)
    if out is not None:
        out.write_text(json.dumps(result.as_dict(), indent=2, default=str) + "\n")
        console.print(f"results written to {out}")


def _print(console: Console, result: DemoResult) -> None:
    table = Table(title="What each device measured on its user's held-out samples")
    for column in (
        "user",
        "preference",
        "device",
        "before",
        "after",
        "gain",
        "gate",
        "knowledge",
        "kn→approved",
    ):
        table.add_column(column, justify="right" if column in {"before", "after", "gain"} else "left")
    for d in result.devices:
        gain = d.acc_v2 - d.acc_v1 if d.acc_v2 is not None and d.acc_v1 is not None else None
        table.add_row(
            d.user,
            ", ".join(f"{k}→{v}" for k, v in d.label_map.items()) or "none",
            d.device_id,
            f"{d.v1} {d.acc_v1:.3f}" if d.acc_v1 is not None else d.v1,
            f"{d.v2} {d.acc_v2:.3f}" if d.v2 and d.acc_v2 is not None else "(keeps v1)",
            f"{gain:+.3f}" if gain is not None else "",
            f"{d.outcome}: {d.reason}"[:60],
            f"{d.knowledge_bytes:,} B" if d.knowledge_bytes else "",
            f"{d.knowledge_to_approved_s:.1f} s" if d.knowledge_to_approved_s is not None else "",
        )
    console.print(table)
    for d in result.devices:
        if d.lineage:
            console.print(f"[bold]lineage of {d.v2}[/bold]")
            for line in d.lineage:
                console.print(f"  {line}")
    console.print("[bold]where to look[/bold]")
    console.print(
        f"  API docs   {result.api_docs}  (the system has stopped; run `diredi demo --keep` to explore)"
    )
    ports = ", ".join(f"{name} :{port}/metrics" for name, port in result.metrics.items())
    console.print(f"  metrics    {result.api_docs.removesuffix('/docs')}/metrics (API), {ports}")
    console.print(f"  state      {result.data_dir}  (registry, artifacts, logs/, devices/<id>/daemon.log)")
    console.print(f"  wall time  {result.wall_s:.0f} s")
