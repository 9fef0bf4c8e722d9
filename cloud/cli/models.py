"""`diredi models`: list, show, approve, reject and trace the lineage of models, over the REST API."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cloud.cli.common import console
from cloud.cli.remote import (
    Column,
    JsonOut,
    Limit,
    Offset,
    Profile,
    Reason,
    api,
    emit,
    paged,
)

models_app = typer.Typer(help="Models: list, show, approve, reject, lineage.")


MODEL_COLUMNS: list[Column] = [
    ("id", lambda m: m.id),
    ("cohort", lambda m: m.cohort_id),
    ("kind", lambda m: m.kind),
    ("version", lambda m: m.version),
    ("status", lambda m: m.status),
    ("parent", lambda m: m.parent_id),
    ("int8 val acc", lambda m: m.metrics.get("val_int8_acc")),
    ("created", lambda m: m.created_at),
]


@models_app.command("list")
def models_list(
    cohort: Annotated[str | None, typer.Option(help="Only this cohort.")] = None,
    kind: Annotated[str | None, typer.Option(help="cloud or edge.")] = None,
    status: Annotated[str | None, typer.Option(help="e.g. candidate, approved, rejected.")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """List models, newest version first within each line."""
    with api(profile) as client:
        page = client.models(cohort_id=cohort, kind=kind, status=status, limit=limit, offset=offset)
    emit(
        page.items,
        MODEL_COLUMNS,
        as_json=as_json,
        title=paged("models", page.total, len(page.items), offset),
    )


@models_app.command("show")
def models_show(model_id: str, as_json: JsonOut = False, profile: Profile = None) -> None:
    """One model, with its metrics and the gate's reason."""
    with api(profile) as client:
        model = client.model(model_id)
    emit(model, [*MODEL_COLUMNS, ("reason", lambda m: m.status_reason), ("sha256", lambda m: m.sha256[:12])],
         as_json=as_json)  # fmt: skip


@models_app.command("approve")
def models_approve(
    model_id: str, reason: Reason = "", as_json: JsonOut = False, profile: Profile = None
) -> None:
    """Approve a candidate edge model: rollouts may then send it."""
    with api(profile) as client:
        model = client.approve(model_id, reason)
    emit(model, MODEL_COLUMNS, as_json=as_json)


@models_app.command("reject")
def models_reject(
    model_id: str, reason: Reason = "", as_json: JsonOut = False, profile: Profile = None
) -> None:
    """Reject a candidate model."""
    with api(profile) as client:
        model = client.reject(model_id, reason)
    emit(model, MODEL_COLUMNS, as_json=as_json)


@models_app.command("lineage")
def models_lineage(
    model_id: str,
    mermaid: Annotated[bool, typer.Option("--mermaid", help="Print the Mermaid graph.")] = False,
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """Where a model came from: its parents, teacher, knowledge and jobs, and who runs it."""
    with api(profile) as client:
        lineage = client.lineage(model_id)
    if as_json:
        console.print_json(lineage.model_dump_json())
    elif mermaid:
        console.print(lineage.mermaid, markup=False, highlight=False)
    else:
        labels = {node.id: node.label for node in lineage.nodes}
        edges = [
            (labels.get(e.source, e.source), e.relation, labels.get(e.target, e.target))
            for e in lineage.edges
        ]
        table = Table("from", "relation", "to", title=f"lineage of {model_id}", title_justify="left")
        for edge in edges:
            table.add_row(*edge)
        console.print(table)
        console.print(f"devices running it: {lineage.running_devices_total}")
