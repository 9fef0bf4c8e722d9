"""The fleet's health in a few numbers (devices by presence, rollouts and jobs by state), for monitoring."""

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import String, and_, cast, func, literal, select, union_all
from sqlalchemy.orm import Session

from cloud.registry.tables import (
    Cohort,
    Device,
    DeviceStatus,
    Job,
    JobState,
    Presence,
    Rollout,
    RolloutState,
    utcnow,
)


@dataclass(frozen=True)
class FleetHealth:
    """Counts with every known state present (zero when none), so a series never appears from nothing."""

    # (cohort, presence) -> active devices; revoked devices are not part of the fleet any more
    devices: dict[tuple[str, str], int] = field(default_factory=dict)
    rollouts: dict[tuple[str, str], int] = field(default_factory=dict)  # (cohort, state) -> rollouts
    jobs: dict[str, int] = field(default_factory=dict)  # state -> jobs
    oldest_pending_s: float = 0.0  # how long the oldest pending job has waited (0: none waits)


def fleet_health(session: Session, *, now: datetime | None = None) -> FleetHealth:
    """The fleet's counts in two aggregate queries (one for devices and rollouts, one for jobs)."""
    now = now or utcnow()
    devices = (
        select(
            literal("device").label("what"),
            Cohort.id.label("cohort"),
            cast(Device.presence, String).label("state"),
            func.count(Device.id).label("n"),
        )
        .select_from(Cohort)
        .outerjoin(Device, and_(Device.cohort_id == Cohort.id, Device.status == DeviceStatus.active))
        .group_by(Cohort.id, Device.presence)
    )
    rollouts = (
        select(
            literal("rollout").label("what"),
            Cohort.id.label("cohort"),
            cast(Rollout.state, String).label("state"),
            func.count(Rollout.id).label("n"),
        )
        .select_from(Cohort)
        .outerjoin(Rollout, Rollout.cohort_id == Cohort.id)
        .group_by(Cohort.id, Rollout.state)
    )
    device_counts: dict[tuple[str, str], int] = {}
    rollout_counts: dict[tuple[str, str], int] = {}
    for what, cohort, state, n in session.execute(union_all(devices, rollouts)):
        counts, states = (device_counts, Presence) if what == "device" else (rollout_counts, RolloutState)
        for known in states:
            counts.setdefault((cohort, known.value), 0)
        if state is not None:  # None: the cohort has none (the outer join's empty side)
            counts[(cohort, state)] = n
    job_counts = {s.value: 0 for s in JobState}
    oldest: datetime | None = None
    jobs = select(Job.state, func.count(), func.min(Job.created_at)).group_by(Job.state)
    for state, n, first in session.execute(jobs):
        job_counts[state.value] = n
        if state is JobState.pending:
            oldest = first
    waited = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
    return FleetHealth(device_counts, rollout_counts, job_counts, waited)
