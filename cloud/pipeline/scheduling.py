"""RD cycle jobs as the API and the beat start them: which cohorts are due, and the job itself. Light
(no ML): the worker's `cycle.py` runs the jobs."""

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.exceptions import ConflictError
from cloud.registry import jobs
from cloud.registry.tables import Device, Job, KnowledgeReport, KnowledgeStatus

JOB_TYPE = "rd_cycle"
TRAINING_DATA = "training_data"  # the cloud model's metrics key holding the scenario it was trained on


def create_cycle_job(
    session: Session, *, cohort_id: str, trigger: str, rollout: dict[str, Any] | None = None
) -> Job:
    """A pending RD cycle job for the cohort, or ConflictError if one is already pending or running."""
    existing = jobs.open_job(session, cohort_id=cohort_id, type=JOB_TYPE)
    if existing is not None:
        raise ConflictError(f"cohort {cohort_id} already has {existing.state.value} job {existing.id}")
    params: dict[str, Any] = {"trigger": trigger}
    if rollout is not None:
        params["rollout"] = rollout
    return jobs.create_job(session, type=JOB_TYPE, cohort_id=cohort_id, params=params)


def cohorts_due(session: Session, *, min_reports: int, max_wait_s: float) -> list[str]:
    """Cohorts whose received knowledge should start a job now: at least `min_reports` reports, or
    an oldest report that has waited `max_wait_s`; cohorts with an open cycle job are left alone."""
    rows = session.execute(
        select(Device.cohort_id, KnowledgeReport.received_at)
        .join(Device, Device.id == KnowledgeReport.device_id)
        .where(KnowledgeReport.status == KnowledgeStatus.received)
    ).all()
    counts: dict[str, int] = {}
    oldest: dict[str, float] = {}
    now = time.time()
    for cohort_id, received_at in rows:
        counts[cohort_id] = counts.get(cohort_id, 0) + 1
        age = now - received_at.timestamp()
        oldest[cohort_id] = max(oldest.get(cohort_id, 0.0), age)
    return [
        cohort_id
        for cohort_id, count in sorted(counts.items())
        if (count >= min_reports or oldest[cohort_id] >= max_wait_s)
        and jobs.open_job(session, cohort_id=cohort_id, type=JOB_TYPE) is None
    ]
