"""Rollouts: start, pause, resume and roll back (the worker's engine carries them out), with their
progress and targets."""

import uuid
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Body, Query
from pydantic import Field
from sqlalchemy.orm import Session

from cloud.api.deps import Caller, Operator, PageQuery, ReaderDep, SessionDep, Viewer
from cloud.api.schemas import Decision, Page, RolloutCreate, RolloutPublic, RolloutTargetPublic, errors
from cloud.pipeline import rollouts as engine
from cloud.registry import audit
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


@router.post(
    "",
    status_code=201,
    responses=errors(
        {
            404: "no such model or device",
            409: "the model is not an approved edge model, a device is not an active one of its cohort, "
            "no device matches the selector, or the cohort has an open rollout",
            422: "a bad selector, or both a selector and a device list",
        }
    ),
)
def create(body: RolloutCreate, session: SessionDep, caller: Operator) -> RolloutPublic:
    """Start a staged rollout of an approved edge model to its cohort, to a list of its devices, or to
    those a label selector matches (resolved again before each wave): the canary first, then the waves
    of the plan, each watched before the next; failed installs or worse telemetry halt it and send its
    devices back to their previous model. Devices already running the model are left out. Only a
    cohort-wide rollout makes its model the one the cohort's other and future devices are given."""
    rollout = engine.start_rollout(
        session,
        model_id=body.model_id,
        plan=body.plan,
        created_by=caller.actor,
        device_ids=body.device_ids,
        selector=body.selector,
    )
    audit.record(
        session,
        actor=caller.actor,
        action="rollout.create",
        target=str(rollout.id),
        model_id=body.model_id,
        plan=rollout.waves["plan"],
        scope=rollout.scope.value,
        selector=rollout.selector,
        devices=sum(stage["size"] for stage in rollout.waves["stages"]),
    )
    session.commit()
    return _public(session, [rollout])[0]


STEER = errors({404: "no such rollout", 409: "the rollout is not in a state this applies to"})


def _steer(
    session: Session, caller: Caller, rollout_id: uuid.UUID, action: str, reason: str
) -> RolloutPublic:
    if action == "pause":
        rollout = engine.pause(session, rollout_id, reason=reason)
    elif action == "resume":
        rollout = engine.resume(session, rollout_id)
    elif action == "halt":
        rollout = engine.stop(session, rollout_id, requested_by=caller.actor, reason=reason)
    else:
        rollout = engine.request_rollback(session, rollout_id, requested_by=caller.actor, reason=reason)
    audit.record(
        session, actor=caller.actor, action=f"rollout.{action}", target=str(rollout_id), reason=reason
    )
    session.commit()
    return _public(session, [rollout])[0]


OptionalDecision = Annotated[Decision | None, Body()]


@router.post("/{rollout_id}/pause", responses=STEER)
def pause(
    rollout_id: uuid.UUID, session: SessionDep, caller: Operator, body: OptionalDecision = None
) -> RolloutPublic:
    """Pause a pending or running rollout: no further device is offered the model until it resumes."""
    return _steer(session, caller, rollout_id, "pause", body.reason if body else "")


@router.post("/{rollout_id}/resume", responses=STEER)
def resume(
    rollout_id: uuid.UUID, session: SessionDep, caller: Operator, body: OptionalDecision = None
) -> RolloutPublic:
    """Resume a paused rollout where it stopped."""
    return _steer(session, caller, rollout_id, "resume", body.reason if body else "")


@router.post("/{rollout_id}/halt", responses=STEER)
def halt(
    rollout_id: uuid.UUID, session: SessionDep, caller: Operator, body: OptionalDecision = None
) -> RolloutPublic:
    """Halt a pending, running or paused rollout without rolling it back (`stopped`): no further
    device is offered the model; the devices keep what they run (one already offered may still
    install it). The cohort's current model is unchanged. A rollback of it afterwards undoes it."""
    return _steer(session, caller, rollout_id, "halt", body.reason if body else "")


@router.post("/{rollout_id}/rollback", responses=STEER)
def rollback(
    rollout_id: uuid.UUID, session: SessionDep, caller: Operator, body: OptionalDecision = None
) -> RolloutPublic:
    """Roll a rollout back: it halts at once, and the engine sends every device it reached a signed
    desired model of the model that device ran before (answered `halted` until that is done, then
    `rolled_back`). A completed or stopped rollout can be rolled back while it is its cohort's latest
    finished one."""
    return _steer(session, caller, rollout_id, "rollback", body.reason if body else "")
