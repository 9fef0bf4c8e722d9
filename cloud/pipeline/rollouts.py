"""Staged rollouts (DESIGN §5): waves with a canary first, halted by failed installs or by worse telemetry,
rolled back by signed desired models; and the cohort's approved model for the devices that join later.

The engine is plain functions over the registry. The API calls the session functions (`start_rollout`,
`pause`, `resume`, `request_rollback`) and never talks to the broker; a worker calls `advance_rollouts`
and `reconcile_desired` every few seconds, which decide and publish. A pass looks only at what changed
(acks, finished rollouts, devices that joined) or is due (a wave's timeout, its watch, its next health
check), through flags the writers set and the pass clears in one transaction (cloud/registry/rollouts.py);
with `full` it looks at everything, as the worker does every few minutes. Each rollout is advanced in one
transaction that holds its row lock: the targets and devices are written (and so locked) first, the
desired models are published, then it commits. A crash between a publish and the commit leaves the
registry as it was, and the next pass publishes the same decision again (a retained desired model
published twice is harmless: the device already running it does nothing).

Which devices a rollout is for (`RolloutScope`): the cohort's, a list, or those a label selector
matches, resolved again before each wave. Only a completed cohort-wide rollout sets the cohort's
current model, which `reconcile_desired` gives the devices outside later rollouts.

A little over the house's 450 lines: the session functions and the pass share the row locking and the
wave logic, which split across modules would have to be exported to each other.
"""

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from cloud.exceptions import ConflictError, InvalidValueError, RegistryError
from cloud.pipeline.rollout_checks import (
    RolloutPlan,
    judge,
    new_stage,
    plan_of,
    set_stage,
    stage_of,
)
from cloud.registry.models import ModelCache, edge_manifest, get_model
from cloud.registry.rollouts import (
    KEPT_ROLLOUTS,
    active_device_of,
    canaries_first,
    cohorts_changed,
    cohorts_to_reconcile,
    create_rollout,
    current_rollout,
    devices_by_id,
    devices_to_reconcile,
    last_wave,
    latest_finished,
    lock_cohort,
    lock_rollout,
    look_again,
    offered_count,
    open_rollout,
    rollouts_due,
    rollouts_in,
    take_acked,
    take_changed,
    target_device_ids,
    targets_of,
    wave_counts,
    wave_targets,
)
from cloud.registry.tables import (
    DeviceStatus,
    ModelKind,
    ModelStatus,
    Rollout,
    RolloutScope,
    RolloutState,
    RolloutTarget,
    TargetState,
    utcnow,
)
from cloud.signing import Desired

__all__ = [
    "DesiredPublisher",
    "RolloutPlan",
    "Step",
    "advance_rollouts",
    "current_model",
    "pause",
    "reconcile_desired",
    "request_rollback",
    "resume",
    "start_rollout",
    "stop",
]

log = logging.getLogger(__name__)

# A pass advances these; paused rollouts wait for `resume`, and halted ones are rolled back.
ADVANCED = (RolloutState.pending, RolloutState.running, RolloutState.halted)


class DesiredPublisher(Protocol):
    """Publishes devices' signed desired models (retained) and returns once the broker has them all;
    `cloud.publisher.CloudPublisher` is one."""

    def publish_desired_many(self, wanted: Sequence[Desired]) -> object: ...


@dataclass
class Step:
    """What one pass did to one rollout."""

    rollout_id: uuid.UUID
    state: RolloutState
    wave: int
    offered: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    note: str = ""


# --- the API's side: plan, pause, resume, roll back -----------------------------------------------


def start_rollout(
    session: Session,
    *,
    model_id: str,
    plan: RolloutPlan | None = None,
    created_by: str,
    device_ids: Sequence[str] | None = None,
    selector: str | None = None,
) -> Rollout:
    """Plan a rollout of an approved edge model to its cohort's active devices, or to `device_ids` (in
    that order), or to those whose labels `selector` matches (resolved again before each later wave,
    so that devices that join the group while it runs get the model too); canary first, and devices
    already running the model are left out. One open rollout per cohort at a time. Only a cohort-wide
    rollout, once completed, makes its model the cohort's current one. The next pass of
    `advance_rollouts` offers the first wave."""
    if device_ids is not None and selector is not None:
        raise InvalidValueError("a rollout is for a list of devices or for a label selector, not both")
    plan = plan or RolloutPlan()
    model = get_model(session, model_id)
    if model.kind is not ModelKind.edge or model.status is not ModelStatus.approved:
        raise ConflictError(f"model {model_id} is not an approved edge model")
    lock_cohort(session, model.cohort_id)
    busy = open_rollout(session, model.cohort_id)
    if busy is not None:
        raise ConflictError(
            f"cohort {model.cohort_id} already has an open rollout {busy}; let it finish or roll it back"
        )
    if selector is not None:
        scope, devices = RolloutScope.selector, canaries_first(session, model.cohort_id, selector=selector)
        if not devices:
            raise ConflictError(f"no active device of cohort {model.cohort_id} matches {selector!r}")
    elif device_ids is not None:
        scope = RolloutScope.devices
        devices = [active_device_of(session, d, model.cohort_id) for d in dict.fromkeys(device_ids)]
    else:
        scope, devices = RolloutScope.cohort, canaries_first(session, model.cohort_id)
    eligible = [d.id for d in devices if d.reported_model_id != model_id]
    waves = plan.split(eligible)
    stages = [new_stage(len(w)) for w in waves]
    document = {"plan": plan.model_dump(mode="json"), "stages": stages}
    rollout = create_rollout(
        session,
        model_id=model_id,
        waves=waves,
        created_by=created_by,
        plan=document,
        scope=scope,
        selector=selector,
    )
    log.info(
        "rollout %s of %s planned (%s): %s devices in %s waves",
        rollout.id,
        model_id,
        scope.value if selector is None else f"selector {selector!r}",
        len(eligible),
        len(waves),
    )
    return rollout


def pause(session: Session, rollout_id: uuid.UUID, *, reason: str = "") -> Rollout:
    """Stop offering further devices until `resume`; what was offered stays offered."""
    rollout = lock_rollout(session, rollout_id)
    if rollout.state not in (RolloutState.pending, RolloutState.running):
        raise ConflictError(
            f"rollout {rollout_id} is {rollout.state.value}; only a pending or running one pauses"
        )
    rollout.state = RolloutState.paused
    rollout.reason = reason or "paused"
    return rollout


def resume(session: Session, rollout_id: uuid.UUID) -> Rollout:
    """Let a paused rollout go on where it stopped."""
    rollout = lock_rollout(session, rollout_id)
    if rollout.state is not RolloutState.paused:
        raise ConflictError(f"rollout {rollout_id} is {rollout.state.value}, not paused")
    offered = offered_count(session, rollout_id)
    rollout.state = RolloutState.running if offered else RolloutState.pending
    rollout.reason = ""
    rollout.check_at = None  # the next pass looks at it
    return rollout


def request_rollback(
    session: Session, rollout_id: uuid.UUID, *, requested_by: str, reason: str = ""
) -> Rollout:
    """Halt the rollout; the next pass sends every device it reached back to its previous model. A
    completed or stopped rollout can be rolled back while it is its cohort's latest finished one and
    nothing newer is open."""
    rollout = lock_rollout(session, rollout_id)
    if rollout.state in KEPT_ROLLOUTS:
        lock_cohort(session, rollout.cohort_id)
        if latest_finished(session, rollout.cohort_id) != rollout.id:
            raise ConflictError(
                f"rollout {rollout_id} is no longer its cohort's latest finished rollout; "
                "roll back the later ones first"
            )
        other = open_rollout(session, rollout.cohort_id)
        if other is not None:
            raise ConflictError(
                f"rollout {other} of cohort {rollout.cohort_id} is open; roll that one back first"
            )
    elif rollout.state not in (RolloutState.pending, RolloutState.running, RolloutState.paused):
        raise ConflictError(f"rollout {rollout_id} is {rollout.state.value}; it cannot be rolled back now")
    rollout.state = RolloutState.halted
    rollout.reason = f"rollback requested by {requested_by}" + (f": {reason}" if reason else "")
    return rollout


def stop(session: Session, rollout_id: uuid.UUID, *, requested_by: str, reason: str = "") -> Rollout:
    """Halt a pending, running or paused rollout without a rollback: no further device is offered the
    model, and the devices keep what they run (one already offered may still install it, as its
    retained document says). The cohort's current model stays what it was, and `reconcile_desired`
    leaves the rollout's devices alone; a rollback of the stopped rollout undoes it."""
    rollout = lock_rollout(session, rollout_id)
    if rollout.state not in (RolloutState.pending, RolloutState.running, RolloutState.paused):
        raise ConflictError(f"rollout {rollout_id} is {rollout.state.value}; only an open one is halted")
    for target in targets_of(session, rollout_id, by="device"):
        if target.state is TargetState.pending:
            target.reason = "not offered: the rollout was halted"
    _finish(rollout, RolloutState.stopped)
    rollout.reason = f"halted by {requested_by}" + (f": {reason}" if reason else "")
    log.warning("rollout %s stopped: %s", rollout.id, rollout.reason)
    return rollout


def current_model(session: Session, cohort_id: str) -> str | None:
    """The cohort's current model: that of its latest completed cohort-wide rollout (None before the
    first)."""
    rollout = current_rollout(session, cohort_id)
    return None if rollout is None else rollout.model_id


# --- the worker's side: one pass -------------------------------------------------------------------


def advance_rollouts(
    sessions: sessionmaker[Session],
    publisher: DesiredPublisher,
    *,
    now: datetime | None = None,
    full: bool = False,
) -> list[Step]:
    """One idempotent pass over the open rollouts, oldest first: offer the current wave, judge it (failed
    installs, telemetry), move on to the next wave or complete, and carry out rollbacks. Only the
    rollouts with news (an ack, a rollback to carry out) or due (a time set by an earlier pass) are
    looked at, unless `full`; nothing changed costs one statement. Each rollout in a transaction of its
    own; a publish error propagates (the worker retries the pass)."""
    now = now or utcnow()
    with sessions() as session:
        rollout_ids = rollouts_in(session, ADVANCED) if full else rollouts_due(session, ADVANCED, now=now)
    steps = []
    for rollout_id in rollout_ids:
        try:
            with sessions() as session, session.begin():
                step = _advance(session, publisher, rollout_id, now)
        except RegistryError as exc:  # this rollout cannot go on as planned; the others still can
            log.error("rollout %s not advanced: %s", rollout_id, exc)
            continue
        if step is not None:
            steps.append(step)
    return steps


def reconcile_desired(
    sessions: sessionmaker[Session], publisher: DesiredPublisher, *, full: bool = False
) -> int:
    """Give each active device outside an open rollout its cohort's current model when its desired model
    differs (a device that joined the cohort later, or one a rollback left elsewhere); return how many
    desired models were published. Only the cohorts where something changed (`cohorts_changed`) are
    looked at, unless `full`: then also those one statement over the fleet finds a device to give a model."""
    with sessions() as session:
        cohorts = cohorts_changed(session)
        if full:
            cohorts |= cohorts_to_reconcile(session)
    published = 0
    for cohort_id in sorted(cohorts):
        with sessions() as session, session.begin():
            published += _reconcile_cohort(session, publisher, cohort_id)
    return published


def _advance(
    session: Session, publisher: DesiredPublisher, rollout_id: uuid.UUID, now: datetime
) -> Step | None:
    rollout = lock_rollout(session, rollout_id)
    if rollout.state not in ADVANCED:  # paused or finished since the list was read: its acks stay flagged
        return None
    take_acked(session, rollout.id)  # what follows reads at least every ack it cleared
    if rollout.state is RolloutState.halted:
        return _roll_back(session, publisher, rollout)
    step, recheck_at = _step(session, publisher, rollout, now)
    if recheck_at != rollout.check_at:
        look_again(session, rollout.id, recheck_at)
    return step


def _step(
    session: Session, publisher: DesiredPublisher, rollout: Rollout, now: datetime
) -> tuple[Step | None, datetime | None]:
    """What the pass does to a pending or running rollout, and when it must look again though nothing
    changes (None: at the next pass)."""
    plan = plan_of(rollout)
    last = last_wave(session, rollout.id)
    if last is None:  # every device already ran the model: it is the cohort's approved model now
        _finish(rollout, RolloutState.completed)
        rollout.reason = "no device needed the model"
        return Step(rollout.id, rollout.state, 0, note="completed"), None
    while True:
        wave_no = rollout.current_wave
        counts = wave_counts(session, rollout.id, wave_no)
        if counts[TargetState.pending]:
            offered = _offer(session, publisher, rollout, now)
            return Step(rollout.id, rollout.state, wave_no, offered=offered), None
        verdict = judge(session, rollout, plan, counts, now)
        if verdict.halt:
            rollout.state = RolloutState.halted
            rollout.reason = verdict.halt
            log.warning("rollout %s halted: %s", rollout.id, verdict.halt)
            return _roll_back(session, publisher, rollout), None
        if not verdict.ready:
            return None, verdict.recheck_at
        joined = _join(session, rollout, wave_no + 1)
        if wave_no >= last and not joined:
            _finish(rollout, RolloutState.completed)
            rollout.reason = ""
            log.info("rollout %s of %s completed", rollout.id, rollout.model_id)
            return Step(rollout.id, rollout.state, wave_no, note="completed"), None
        last = max(last, wave_no + 1)
        rollout.current_wave = wave_no + 1
        log.info("rollout %s: wave %s done, wave %s next", rollout.id, wave_no, wave_no + 1)


def _finish(rollout: Rollout, state: RolloutState) -> None:
    """Finish the rollout (completed, stopped, rolled back), flagged for reconcile_desired, which then
    looks at its cohort."""
    rollout.state, rollout.changed, rollout.check_at = state, True, None


def _offer(session: Session, publisher: DesiredPublisher, rollout: Rollout, now: datetime) -> list[str]:
    """Offer the current wave's pending targets: write the targets and devices, then publish."""
    model = get_model(session, rollout.model_id)
    manifest = edge_manifest(model)
    pending = wave_targets(session, rollout.id, rollout.current_wave, [TargetState.pending])
    devices = devices_by_id(session, [t.device_id for t in pending])
    in_group = _in_group(session, rollout)
    models = ModelCache(session)
    to_publish: list[Desired] = []
    for target in pending:
        device = devices[target.device_id]
        if device.status is not DeviceStatus.active:  # revoked since the rollout was planned
            log.info("rollout %s: %s is revoked, left out", rollout.id, device.id)
            session.delete(target)
            continue
        if in_group is not None and device.id not in in_group:  # its labels changed since
            log.info("rollout %s: %s no longer matches %r, left out", rollout.id, device.id, rollout.selector)
            session.delete(target)
            continue
        if device.reported_model_id == model.id:  # it got the model some other way: it would not ack
            target.state, target.reason = TargetState.installed, "already running it"
            continue
        if device.reported_model_id is not None:  # what a rollback must restore is what it runs now
            target.previous_model_id = device.reported_model_id
        target.state, target.reason = TargetState.offered, ""
        device.desired_model_id = model.id
        to_publish.append(Desired(device.id, manifest, models.rollback_of(model, device.reported_model_id)))
    rollout.state = RolloutState.running
    set_stage(
        rollout,
        rollout.current_wave,
        offered_at=stage_of(rollout, rollout.current_wave).get("offered_at") or now.isoformat(),
    )
    session.flush()  # the rows are locked before any device hears of them (its ack waits for the commit)
    if to_publish:
        publisher.publish_desired_many(to_publish)
        log.info(
            "rollout %s: wave %s offered to %s devices", rollout.id, rollout.current_wave, len(to_publish)
        )
    return [desired.device_id for desired in to_publish]


def _roll_back(session: Session, publisher: DesiredPublisher, rollout: Rollout) -> Step:
    """Send every device the rollout reached back to the model it ran before, with a signed rollback
    (`rollback_of` = the rollout's model): installed, offered (the retained document would install it
    later) and failed ones alike; then the rollout is rolled back."""
    targets = targets_of(session, rollout.id, by="device")
    reached = [t for t in targets if t.state is not TargetState.pending]
    devices = devices_by_id(session, [t.device_id for t in reached])
    models = ModelCache(session)
    to_publish: list[Desired] = []
    for target in targets:
        if target.state is TargetState.pending:
            target.reason = "not offered: the rollout was rolled back"
            continue
        manifest = models.manifest(target.previous_model_id)
        was = target.state.value + (f" ({target.reason})" if target.reason else "")
        if manifest is None:
            target.reason = f"{was}; not rolled back: no earlier edge model is recorded for it"[:1000]
            continue
        target.state = TargetState.rolled_back
        target.reason = f"{was}; rolled back to {target.previous_model_id}"[:1000]
        devices[target.device_id].desired_model_id = target.previous_model_id
        to_publish.append(Desired(target.device_id, manifest, rollback_of=rollout.model_id))
    _finish(rollout, RolloutState.rolled_back)
    if not to_publish:  # say so: "rolled back" alone reads as if devices had changed
        kept = len(reached)  # no state changed: none was rolled back
        why = f"{kept} reached, none with an earlier edge model recorded" if kept else "none was offered it"
        rollout.reason = f"{rollout.reason}; no device changed ({why})"[:1000]
    session.flush()
    if to_publish:
        publisher.publish_desired_many(to_publish)
    log.warning("rollout %s rolled back on %s devices: %s", rollout.id, len(to_publish), rollout.reason)
    return Step(
        rollout.id,
        rollout.state,
        rollout.current_wave,
        rolled_back=[desired.device_id for desired in to_publish],
        note=rollout.reason,
    )


def _reconcile_cohort(session: Session, publisher: DesiredPublisher, cohort_id: str) -> int:
    take_changed(session, cohort_id)  # what follows reads at least every change it cleared
    current = current_rollout(session, cohort_id)
    if current is None:
        return 0
    model_id = current.model_id
    devices = devices_to_reconcile(session, current)
    if not devices:
        return 0
    models = ModelCache(session)
    model = models.get(model_id)
    assert model is not None  # noqa: S101 - a rollout's model is a foreign key
    manifest = edge_manifest(model)
    to_publish = []
    for device in devices:
        device.desired_model_id = model_id
        to_publish.append(Desired(device.id, manifest, models.rollback_of(model, device.reported_model_id)))
    session.flush()
    publisher.publish_desired_many(to_publish)
    log.info("cohort %s: %s devices given its current model %s", cohort_id, len(to_publish), model_id)
    return len(to_publish)


# --- helpers -------------------------------------------------------------------------------------


def _in_group(session: Session, rollout: Rollout) -> set[str] | None:
    """The ids of the devices a selector rollout's selector matches now (None for other rollouts)."""
    if rollout.scope is not RolloutScope.selector or rollout.selector is None:
        return None
    return {d.id for d in canaries_first(session, rollout.cohort_id, selector=rollout.selector)}


def _join(session: Session, rollout: Rollout, wave: int) -> list[RolloutTarget]:
    """The devices that joined a selector rollout's group since it was resolved, as new targets of
    `wave` (the next one to be offered); none for other rollouts."""
    if rollout.scope is not RolloutScope.selector or rollout.selector is None:
        return []
    known = target_device_ids(session, rollout.id)
    devices = canaries_first(session, rollout.cohort_id, selector=rollout.selector)
    joined = [
        RolloutTarget(
            rollout_id=rollout.id,
            device_id=d.id,
            wave=wave,
            state=TargetState.pending,
            reason="",
            previous_model_id=d.reported_model_id,
        )
        for d in devices
        if d.id not in known and d.reported_model_id != rollout.model_id
    ]
    if joined:
        size = sum(wave_counts(session, rollout.id, wave).values()) + len(joined)
        session.add_all(joined)
        set_stage(rollout, wave, **{**new_stage(size), **stage_of(rollout, wave), "size": size})
        log.info("rollout %s: %s devices joined %r", rollout.id, len(joined), rollout.selector)
    return joined
