"""Models: list and filter, detail with manifest, lineage, and the approve/reject/retire decisions."""

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from cloud.api.deps import Caller, Operator, PageQuery, ReaderDep, SessionDep, Viewer
from cloud.api.schemas import (
    Decision,
    LineageEdge,
    LineageNode,
    LineagePublic,
    ModelDetail,
    ModelPublic,
    Page,
    errors,
)
from cloud.registry import audit
from cloud.registry.lineage import lineage
from cloud.registry.models import decide, get_model, list_models, retire
from cloud.registry.tables import ModelKind, ModelStatus

router = APIRouter(prefix="/api/v1/models", tags=["models"])
NOT_FOUND = errors({404: "no such model"})


class ModelFilter(PageQuery):
    cohort_id: str | None = None
    kind: ModelKind | None = None
    status: ModelStatus | None = None


@router.get("")
async def list_(reader: ReaderDep, _: Viewer, query: Annotated[ModelFilter, Query()]) -> Page[ModelPublic]:
    """List models, newest version first within each line, filtered by cohort, kind or status."""
    rows, total = await reader.run_sync(
        list_models,
        limit=query.limit,
        offset=query.offset,
        cohort_id=query.cohort_id,
        kind=query.kind,
        status=query.status,
    )
    return Page.of(ModelPublic, rows, total, limit=query.limit, offset=query.offset)


@router.get("/{model_id}", responses=NOT_FOUND)
async def get(model_id: str, reader: ReaderDep, _: Viewer) -> ModelDetail:
    """One model, with its artifact manifest (edge models)."""
    return ModelDetail.model_validate(await reader.run_sync(get_model, model_id))


@router.get("/{model_id}/lineage", responses=NOT_FOUND)
def get_lineage(model_id: str, session: SessionDep, _: Viewer) -> LineagePublic:
    """Where the model came from and where it runs: its teacher/parent chain, the jobs and knowledge
    reports (and their devices) behind each model of the chain, and the devices running it now.
    Edges point from cause to effect; `mermaid` renders the graph for humans."""
    graph = lineage(session, model_id)  # sync, in the thread pool: a large graph is CPU work
    return LineagePublic(
        model_id=graph.model_id,
        nodes=[LineageNode.model_validate(n) for n in graph.nodes.values()],
        edges=[LineageEdge.model_validate(e) for e in graph.edges],
        running_devices_total=graph.running_devices_total,
        mermaid=graph.mermaid(),
    )


def _decide(session: Session, caller: Caller, model_id: str, action: str, reason: str) -> ModelPublic:
    if action == "retire":
        model = retire(session, model_id, reason=reason)
    else:
        model = decide(session, model_id, approve=action == "approve", reason=reason)
    audit.record(session, actor=caller.actor, action=f"model.{action}", target=model_id, reason=reason)
    session.commit()
    return ModelPublic.model_validate(model)


CONFLICT = errors({404: "no such model", 409: "the model is not in a state this decision applies to"})


@router.post("/{model_id}/approve", responses=CONFLICT)
def approve(model_id: str, body: Decision, session: SessionDep, caller: Operator) -> ModelPublic:
    """Approve a candidate model: it may now be rolled out."""
    return _decide(session, caller, model_id, "approve", body.reason)


@router.post("/{model_id}/reject", responses=CONFLICT)
def reject(model_id: str, body: Decision, session: SessionDep, caller: Operator) -> ModelPublic:
    """Reject a candidate model, with the reason."""
    return _decide(session, caller, model_id, "reject", body.reason)


@router.post("/{model_id}/retire", responses=CONFLICT)
def retire_(model_id: str, body: Decision, session: SessionDep, caller: Operator) -> ModelPublic:
    """Retire an approved model: no new rollout may use it."""
    return _decide(session, caller, model_id, "retire", body.reason)
