"""Rollouts with their progress and targets. (Creating and steering them comes with the pipeline.)"""

import uuid
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy.orm import Session

from cloud.api.deps import PageQuery, ReaderDep, Viewer
from cloud.api.schemas import Page, RolloutPublic, RolloutTargetPublic, errors
from cloud.registry.rollouts import get_rollout, list_rollouts, list_targets, target_counts
from cloud.registry.tables import Rollout, RolloutState, TargetState

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])
NOT_FOUND = errors({404: "no such rollout"})


class RolloutFilter(PageQuery):
    cohort_id: str | None = Field(None, max_length=63)
    state: RolloutState | None = None


def _public(session: Session, rollouts: Sequence[Rollout]) -> list[RolloutPublic]:
    counts = target_counts(session, [r.id for r in rollouts])
    out = []
    for rollout in rollouts:
        targets = counts[rollout.id]
        total = sum(targets.values())
        progress = targets[TargetState.installed.value] / total if total else 0.0
        # The row's own columns; `targets` is the counts above, not the (lazily loaded) relationship.
        fields = {c: getattr(rollout, c) for c in RolloutPublic.model_fields.keys() - {"targets", "progress"}}
        out.append(RolloutPublic.model_validate({**fields, "targets": targets, "progress": progress}))
    return out


@router.get("")
async def list_(
    reader: ReaderDep, _: Viewer, query: Annotated[RolloutFilter, Query()]
) -> Page[RolloutPublic]:
    """List rollouts, newest first, with each one's progress."""
    rows, total = await reader.run_sync(
        list_rollouts, limit=query.limit, offset=query.offset, cohort_id=query.cohort_id, state=query.state
    )
    return Page(
        items=await reader.run_sync(_public, rows), total=total, limit=query.limit, offset=query.offset
    )


@router.get("/{rollout_id}", responses=NOT_FOUND)
async def get(rollout_id: uuid.UUID, reader: ReaderDep, _: Viewer) -> RolloutPublic:
    """One rollout with its progress: how many targets are in each state."""
    rollout = await reader.run_sync(get_rollout, rollout_id)
    return (await reader.run_sync(_public, [rollout]))[0]


@router.get("/{rollout_id}/targets", responses=NOT_FOUND)
async def targets(
    rollout_id: uuid.UUID, reader: ReaderDep, _: Viewer, page: Annotated[PageQuery, Query()]
) -> Page[RolloutTargetPublic]:
    """The rollout's devices by wave (wave 0 is the canary), each with its state."""
    await reader.run_sync(get_rollout, rollout_id)
    rows, total = await reader.run_sync(list_targets, rollout_id, limit=page.limit, offset=page.offset)
    return Page.of(RolloutTargetPublic, rows, total, limit=page.limit, offset=page.offset)
