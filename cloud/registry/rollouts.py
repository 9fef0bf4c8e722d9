"""Rollouts and their targets: the plan and the per-device state; cloud/pipeline/rollouts.py steers them."""

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Select, and_, case, exists, func, or_, select, union, update
from sqlalchemy.orm import Session, aliased

from cloud.exceptions import ConflictError, NotFoundError
from cloud.registry import labels
from cloud.registry.common import paginate
from cloud.registry.devices import get_device
from cloud.registry.models import get_model
from cloud.registry.tables import (
    Cohort,
    Device,
    DeviceStatus,
    ModelKind,
    ModelStatus,
    Presence,
    Rollout,
    RolloutScope,
    RolloutState,
    RolloutTarget,
    TargetState,
)

# Rollouts still under way: pending, running, paused, or halted (a rollback decided, not yet carried out).
OPEN_ROLLOUTS = (RolloutState.pending, RolloutState.running, RolloutState.paused, RolloutState.halted)
# Finished rollouts whose devices keep the model (until a later rollout or a rollback).
KEPT_ROLLOUTS = (RolloutState.completed, RolloutState.stopped)


def create_rollout(
    session: Session,
    *,
    model_id: str,
    waves: Sequence[Sequence[str]],
    created_by: str,
    plan: dict[str, Any] | None = None,
    scope: RolloutScope = RolloutScope.cohort,
    selector: str | None = None,
) -> Rollout:
    """A pending rollout of an approved edge model to the given waves of devices (wave 0 is the canary);
    `scope` says which devices it is for (with the `selector` of a selector rollout)."""
    model = get_model(session, model_id)
    if model.kind is not ModelKind.edge or model.status is not ModelStatus.approved:
        raise ConflictError(f"model {model_id} is not an approved edge model")
    previous: dict[str, str | None] = {}  # what each device runs now: a rollback sends it back there
    for device_ids in waves:  # check every device before writing anything
        for device_id in device_ids:
            device = get_device(session, device_id)
            if device.cohort_id != model.cohort_id:
                raise ConflictError(f"device {device_id} is not in cohort {model.cohort_id}")
            if device_id in previous:
                raise ConflictError(f"device {device_id} is in two waves")
            previous[device_id] = device.reported_model_id
    rollout = Rollout(
        cohort_id=model.cohort_id,
        model_id=model_id,
        created_by=created_by,
        waves=plan or {},
        scope=scope,
        selector=selector,
    )
    session.add(rollout)
    session.flush()
    for wave, device_ids in enumerate(waves):
        session.add_all(
            RolloutTarget(rollout_id=rollout.id, device_id=d, wave=wave, previous_model_id=previous[d])
            for d in device_ids
        )
    session.flush()
    return rollout


def lock_rollout(session: Session, rollout_id: uuid.UUID) -> Rollout:
    """The rollout, locked until the transaction ends (or NotFoundError): whoever changes a rollout's
    state holds this lock, so a pass of the engine and an operator's request never interleave.

    PostgreSQL locks the row (`FOR UPDATE`). SQLite ignores `FOR UPDATE`, so there a no-op UPDATE
    first takes the database's write lock, which is held until the commit just the same."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(
            update(Rollout)
            .where(Rollout.id == rollout_id)
            .values(state=Rollout.state, updated_at=Rollout.updated_at)  # changes nothing
            .execution_options(synchronize_session=False)
        )
    rollout = session.scalars(
        select(Rollout)
        .where(Rollout.id == rollout_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    if rollout is None:
        raise NotFoundError("rollout", rollout_id)
    return rollout


def get_rollout(session: Session, rollout_id: uuid.UUID) -> Rollout:
    """The rollout, or NotFoundError."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFoundError("rollout", rollout_id)
    return rollout


def target_counts(session: Session, rollout_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[str, int]]:
    """For each rollout, how many targets are in each state (its progress)."""
    counts: dict[uuid.UUID, dict[str, int]] = {rid: {s.value: 0 for s in TargetState} for rid in rollout_ids}
    rows = session.execute(
        select(RolloutTarget.rollout_id, RolloutTarget.state, func.count())
        .where(RolloutTarget.rollout_id.in_(rollout_ids))
        .group_by(RolloutTarget.rollout_id, RolloutTarget.state)
    ).all()
    for rollout_id, state, count in rows:
        counts[rollout_id][TargetState(state).value] = int(count)
    return counts


def list_rollouts(
    session: Session,
    *,
    limit: int,
    offset: int,
    cohort_id: str | None = None,
    state: RolloutState | None = None,
) -> tuple[Sequence[Rollout], int]:
    """A page of rollouts, newest first, filtered, with the total."""
    statement: Select[Rollout] = select(Rollout).order_by(Rollout.created_at.desc(), Rollout.id)
    if cohort_id is not None:
        statement = statement.where(Rollout.cohort_id == cohort_id)
    if state is not None:
        statement = statement.where(Rollout.state == state)
    return paginate(session, statement, limit=limit, offset=offset)


def list_targets(
    session: Session, rollout_id: uuid.UUID, *, limit: int, offset: int
) -> tuple[Sequence[RolloutTarget], int]:
    """A page of a rollout's targets by wave and device."""
    statement = (
        select(RolloutTarget)
        .where(RolloutTarget.rollout_id == rollout_id)
        .order_by(RolloutTarget.wave, RolloutTarget.device_id)
    )
    return paginate(session, statement, limit=limit, offset=offset)


# --- what the rollout engine (cloud/pipeline/rollouts.py) reads and locks -----------------------------


def lock_cohort(session: Session, cohort_id: str) -> None:
    """Serialise the rollout decisions of one cohort (as `lock_rollout` does for one rollout)."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Cohort).where(Cohort.id == cohort_id).values(description=Cohort.description))
    if session.scalar(select(Cohort.id).where(Cohort.id == cohort_id).with_for_update()) is None:
        raise NotFoundError("cohort", cohort_id)


def open_rollout(session: Session, cohort_id: str) -> uuid.UUID | None:
    """The cohort's rollout that is not finished (pending, running, paused, or halted and not yet rolled
    back), if any."""
    return session.scalar(
        select(Rollout.id).where(Rollout.cohort_id == cohort_id, Rollout.state.in_(OPEN_ROLLOUTS)).limit(1)
    )


def current_rollout(session: Session, cohort_id: str) -> Rollout | None:
    """The cohort's latest completed cohort-wide rollout: its model is the cohort's current one, which
    devices outside later targeted rollouts are given (see `devices_to_reconcile`)."""
    return session.scalar(
        select(Rollout)
        .where(
            Rollout.cohort_id == cohort_id,
            Rollout.state == RolloutState.completed,
            Rollout.scope == RolloutScope.cohort,
        )
        .order_by(Rollout.created_at.desc(), Rollout.id.desc())
        .limit(1)
    )


def latest_finished(session: Session, cohort_id: str) -> uuid.UUID | None:
    """The cohort's latest completed or stopped rollout, of any scope: the only one that may still be
    rolled back (an earlier one's devices may have moved on since)."""
    return session.scalar(
        select(Rollout.id)
        .where(Rollout.cohort_id == cohort_id, Rollout.state.in_(KEPT_ROLLOUTS))
        .order_by(Rollout.created_at.desc(), Rollout.id.desc())
        .limit(1)
    )


def rollouts_in(session: Session, states: Collection[RolloutState]) -> list[uuid.UUID]:
    """The rollouts in `states`, oldest first."""
    rows = session.scalars(
        select(Rollout.id).where(Rollout.state.in_(states)).order_by(Rollout.created_at, Rollout.id)
    )
    return list(rows)


def offered_count(session: Session, rollout_id: uuid.UUID) -> int:
    """How many of the rollout's targets have been offered the model (or got further)."""
    count = session.scalar(
        select(func.count())
        .select_from(RolloutTarget)
        .where(RolloutTarget.rollout_id == rollout_id, RolloutTarget.state != TargetState.pending)
    )
    return int(count or 0)


def targets_of(
    session: Session, rollout_id: uuid.UUID, *, by: Literal["wave", "device"]
) -> list[RolloutTarget]:
    """The rollout's targets, by wave or by device id."""
    order = RolloutTarget.wave if by == "wave" else RolloutTarget.device_id
    return list(
        session.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == rollout_id).order_by(order))
    )


def canaries_first(session: Session, cohort_id: str, *, selector: str | None = None) -> list[Device]:
    """The cohort's active devices (those `selector` matches, if given: `labels.parse_selector`), those
    online now first (they make the better canaries: they answer at once), then by when they were last
    seen."""
    statement = (
        select(Device)
        .where(Device.cohort_id == cohort_id, Device.status == DeviceStatus.active)
        .order_by(
            case((Device.presence == Presence.online, 0), else_=1),
            Device.last_seen.desc().nulls_last(),
            Device.id,
        )
    )
    if selector is not None:
        terms, dialect = labels.parse_selector(selector), session.get_bind().dialect.name
        statement = statement.where(*labels.where(labels.shape(terms), dialect)).params(
            labels.bound(terms, dialect)
        )
    return list(session.scalars(statement))


def active_device_of(session: Session, device_id: str, cohort_id: str) -> Device:
    """The device, which must be active and in the cohort (NotFoundError, ConflictError)."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError("device", device_id)
    if device.cohort_id != cohort_id:
        raise ConflictError(f"device {device_id} is not in cohort {cohort_id}")
    if device.status is not DeviceStatus.active:
        raise ConflictError(f"device {device_id} is {device.status.value}")
    return device


def devices_by_id(session: Session, device_ids: Sequence[str]) -> dict[str, Device]:
    """The devices of `device_ids` by id, read in one query."""
    if not device_ids:
        return {}
    rows = session.scalars(select(Device).where(Device.id.in_(device_ids)).order_by(Device.id))
    return {d.id: d for d in rows}


def devices_to_reconcile(session: Session, current: Rollout) -> list[Device]:
    """The active devices of the cohort of `current` (its latest completed cohort-wide rollout) whose
    desired model is not its model, locked (key share) for the transaction that gives them it. Left
    out: the devices of open rollouts, and those a later rollout to some devices, or a later rollout an
    operator stopped, gave another model (they keep it until a rollout replaces it or it is rolled
    back). Read through the cohort's devices whose desired model differs (`ix_device_cohort_desired`),
    each then looked up in the rollouts: not the whole cohort."""
    rows = session.scalars(
        select(Device)
        .where(*_left_behind(current.cohort_id, current.model_id, current.created_at))
        .order_by(Device.id)
        .with_for_update(key_share=True)
    )
    return list(rows)


def cohorts_to_reconcile(session: Session) -> set[str]:
    """The cohorts with a device `devices_to_reconcile` would give its cohort's current model, found by
    one statement over the whole fleet (reconcile_desired's full pass) rather than one per cohort."""
    ranked = (
        select(
            Rollout.cohort_id,
            Rollout.model_id,
            Rollout.created_at,
            func.row_number()
            .over(partition_by=Rollout.cohort_id, order_by=(Rollout.created_at.desc(), Rollout.id.desc()))
            .label("n"),
        )
        .where(Rollout.state == RolloutState.completed, Rollout.scope == RolloutScope.cohort)
        .subquery()
    )
    current = select(ranked).where(ranked.c.n == 1).subquery()
    rows = session.scalars(
        select(Device.cohort_id)
        .join(current, current.c.cohort_id == Device.cohort_id)
        .where(*_left_behind(current.c.cohort_id, current.c.model_id, current.c.created_at))
        .distinct()
    )
    return set(rows)


def _left_behind(cohort_id: Any, model_id: Any, since: Any) -> list[ColumnElement[bool]]:
    """What makes a device one `devices_to_reconcile` gives `model_id`, that of its cohort's current
    rollout, made at `since` (values, or columns of a query). A device's rollouts are its cohort's
    (`create_rollout` checks), so they are looked up by the device alone: one index probe each."""
    other = aliased(Rollout)
    in_open_rollout = exists().where(
        RolloutTarget.device_id == Device.id,
        other.id == RolloutTarget.rollout_id,
        other.state.in_(OPEN_ROLLOUTS),
    )
    kept_by_later_rollout = exists().where(
        RolloutTarget.device_id == Device.id,
        other.id == RolloutTarget.rollout_id,
        or_(
            and_(other.state == RolloutState.completed, other.scope != RolloutScope.cohort),
            other.state == RolloutState.stopped,
        ),
        other.created_at > since,
        RolloutTarget.state.in_((TargetState.offered, TargetState.installed)),
    )
    # `<` or `>`, not `!=`: each is a range of the index, where `!=` would read the cohort whole.
    differs = or_(
        Device.desired_model_id.is_(None),
        Device.desired_model_id < model_id,
        Device.desired_model_id > model_id,
    )
    return [
        Device.cohort_id == cohort_id,
        differs,
        Device.status == DeviceStatus.active,
        ~in_open_rollout,
        ~kept_by_later_rollout,
    ]


# --- what the beat's passes read to skip what did not change (migration 0014) ---------------------------
#
# A writer flags what it changed in the transaction that changes it: an ack its rollout target
# (`RolloutTarget.changed`, acks.record_acks), the engine a rollout it finished (`Rollout.changed`). A pass
# clears a flag in the transaction that looks at what it flags, with one UPDATE whose rows are exactly
# those cleared: a flag set by a transaction that commits later is left for the next pass, and a pass
# that fails leaves its flags set. No clock is compared, so transactions that commit out of order lose
# nothing. The open rollouts' target flags are advance_rollouts'; the finished rollouts' are
# reconcile_desired's.


def rollouts_due(session: Session, states: Collection[RolloutState], *, now: datetime) -> list[uuid.UUID]:
    """The rollouts in `states` that a pass of the engine must look at, oldest first: halted ones (a
    rollback to carry out), those whose time to be looked at again has come (or was never set), and
    those with a target an ack moved since the engine last looked. One statement, whatever the fleet."""
    acked = exists().where(RolloutTarget.rollout_id == Rollout.id, RolloutTarget.changed)
    due = or_(
        Rollout.state == RolloutState.halted, Rollout.check_at.is_(None), Rollout.check_at <= now, acked
    )
    rows = session.scalars(
        select(Rollout.id).where(Rollout.state.in_(states), due).order_by(Rollout.created_at, Rollout.id)
    )
    return list(rows)


def take_acked(session: Session, rollout_id: uuid.UUID) -> int:
    """Clear the `changed` flags of the rollout's targets, for the transaction that now looks at them;
    how many were set."""
    result = session.execute(
        update(RolloutTarget)
        .where(RolloutTarget.rollout_id == rollout_id, RolloutTarget.changed)
        .values(changed=False, updated_at=RolloutTarget.updated_at)  # bookkeeping: not a change of the target
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def look_again(session: Session, rollout_id: uuid.UUID, at: datetime | None) -> None:
    """When the engine must look at the rollout again though nothing changed (None: at its next pass)."""
    session.execute(
        update(Rollout)
        .where(Rollout.id == rollout_id)
        .values(check_at=at, updated_at=Rollout.updated_at)  # bookkeeping: not a change of the rollout
        .execution_options(synchronize_session=False)
    )


def last_wave(session: Session, rollout_id: uuid.UUID) -> int | None:
    """The rollout's last wave (None: it has no target)."""
    return session.scalar(select(func.max(RolloutTarget.wave)).where(RolloutTarget.rollout_id == rollout_id))


def wave_counts(session: Session, rollout_id: uuid.UUID, wave: int) -> dict[TargetState, int]:
    """How many of the wave's targets are in each state (counted in the index, no target read)."""
    counts = dict.fromkeys(TargetState, 0)
    rows = session.execute(
        select(RolloutTarget.state, func.count())
        .where(RolloutTarget.rollout_id == rollout_id, RolloutTarget.wave == wave)
        .group_by(RolloutTarget.state)
    )
    for state, count in rows:
        counts[TargetState(state)] = int(count)
    return counts


def wave_targets(
    session: Session,
    rollout_id: uuid.UUID,
    wave: int,
    states: Collection[TargetState],
    *,
    limit: int | None = None,
) -> list[RolloutTarget]:
    """The wave's targets in `states`, by device id (the first `limit` of them)."""
    statement = (
        select(RolloutTarget)
        .where(
            RolloutTarget.rollout_id == rollout_id,
            RolloutTarget.wave == wave,
            RolloutTarget.state.in_(states),
        )
        .order_by(RolloutTarget.device_id)
        .limit(limit)
    )
    return list(session.scalars(statement))


def target_device_ids(session: Session, rollout_id: uuid.UUID) -> set[str]:
    """The ids of the rollout's devices."""
    return set(session.scalars(select(RolloutTarget.device_id).where(RolloutTarget.rollout_id == rollout_id)))


def cohorts_changed(session: Session) -> set[str]:
    """The cohorts whose devices reconcile_desired may have to give a model now: those with a rollout
    finished since it last looked (`Rollout.changed`), with a target of a finished rollout an ack moved
    (a device a later rollout kept may have left it), and those with an active device that has no
    desired model while the cohort has a current model and no open rollout holds the device (one that
    joined). Each read through a small index; none reads a cohort whole."""
    finished = select(Rollout.cohort_id).where(Rollout.changed)
    acked = (
        select(Rollout.cohort_id)
        .join(RolloutTarget, RolloutTarget.rollout_id == Rollout.id)
        .where(RolloutTarget.changed, Rollout.state.not_in(OPEN_ROLLOUTS))
    )
    current, holding = aliased(Rollout), aliased(Rollout)
    has_current = exists().where(
        current.cohort_id == Device.cohort_id,
        current.state == RolloutState.completed,
        current.scope == RolloutScope.cohort,
    )
    held = exists().where(
        RolloutTarget.device_id == Device.id,
        holding.id == RolloutTarget.rollout_id,
        holding.state.in_(OPEN_ROLLOUTS),
    )
    joined = select(Device.cohort_id).where(
        Device.desired_model_id.is_(None), Device.status == DeviceStatus.active, has_current, ~held
    )
    return set(session.scalars(union(finished, acked, joined)))


def take_changed(session: Session, cohort_id: str) -> None:
    """Clear the flags `cohorts_changed` found for the cohort, for the transaction that now looks at it:
    its finished rollouts', and their targets'."""
    finished = select(Rollout.id).where(Rollout.cohort_id == cohort_id, Rollout.state.not_in(OPEN_ROLLOUTS))
    session.execute(
        update(Rollout)
        .where(Rollout.cohort_id == cohort_id, Rollout.changed)
        .values(changed=False, updated_at=Rollout.updated_at)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(RolloutTarget)
        .where(RolloutTarget.changed, RolloutTarget.rollout_id.in_(finished))
        .values(changed=False, updated_at=RolloutTarget.updated_at)
        .execution_options(synchronize_session=False)
    )
