"""RD cycle jobs as the API and the beat start them: which cohorts are due, and the job itself. Light
(no ML): the worker's `cycle.py` runs the jobs.

The beat's pass looks only at the cohorts where something changed (`cohorts_with_news`): a report it
has not noticed yet (`KnowledgeReport.noticed`, false as the ingest stores it, set by the pass in the
transaction that starts the cohort's jobs), a report that has waited `max_wait_s`, or a job of the
cohort that finished lately (its reports may be left for the next job). A report's cohort is that of
its base model, which `knowledge.store_report` checks is its device's, so the received reports of a
cohort are read through `ix_knowledge_report_waiting`, by base model, never the cohort's devices.
"""

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from cloud.exceptions import ConflictError
from cloud.registry import jobs
from cloud.registry.tables import Job, JobState, KnowledgeReport, KnowledgeStatus, Model, utcnow

JOB_TYPE = "rd_cycle"
TRAINING_DATA = "training_data"  # the cloud model's metrics key holding the scenario it was trained on
OPEN = (JobState.pending, JobState.running)


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


def cohorts_due(
    session: Session,
    *,
    min_reports: int,
    max_wait_s: float,
    among: Collection[str] | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Cohorts whose received knowledge should start a job now: at least `min_reports` reports, or
    an oldest report that has waited `max_wait_s`; cohorts with an open cycle job are left alone. Only
    the cohorts `among` (all with received reports when None), by id."""
    cutoff = (now or utcnow()) - timedelta(seconds=max_wait_s)
    statement = (
        select(Model.cohort_id, func.count(), func.min(KnowledgeReport.received_at))
        .join(Model, Model.id == KnowledgeReport.base_model_id)
        .where(KnowledgeReport.status == KnowledgeStatus.received)
        .group_by(Model.cohort_id)
    )
    if among is None:
        rows = list(session.execute(statement).tuples())
    else:
        rows = []
        for chunk in _chunks(sorted(among)):
            rows += session.execute(statement.where(Model.cohort_id.in_(chunk))).tuples()
    ready = sorted(cohort for cohort, count, oldest in rows if count >= min_reports or oldest <= cutoff)
    busy: set[str | None] = set()
    for chunk in _chunks(ready):
        busy |= set(
            session.scalars(
                select(Job.cohort_id).where(
                    Job.cohort_id.in_(chunk), Job.type == JOB_TYPE, Job.state.in_(OPEN)
                )
            )
        )
    return [cohort_id for cohort_id in ready if cohort_id not in busy]


def cohorts_with_news(
    session: Session, *, max_wait_s: float, jobs_finished_since: datetime | None, now: datetime | None = None
) -> set[str]:
    """The cohorts whose received knowledge may have become due since the pass before: those of the
    reports not noticed yet (marked noticed here, in the caller's transaction), of reports that have
    waited `max_wait_s`, and of cycle jobs finished since `jobs_finished_since` (None: none asked for;
    the caller then looks at every cohort). Reads what changed, through small indexes."""
    noticed = session.execute(
        update(KnowledgeReport)
        .where(~KnowledgeReport.noticed)
        .values(noticed=True)
        .returning(KnowledgeReport.base_model_id)
        .execution_options(synchronize_session=False)
    )
    models = {model_id for (model_id,) in noticed}
    cohorts = set()
    for chunk in _chunks(sorted(models)):
        cohorts |= set(session.scalars(select(Model.cohort_id).where(Model.id.in_(chunk))))
    cutoff = (now or utcnow()) - timedelta(seconds=max_wait_s)
    cohorts |= set(
        session.scalars(
            select(Model.cohort_id)
            .join(KnowledgeReport, KnowledgeReport.base_model_id == Model.id)
            .where(KnowledgeReport.status == KnowledgeStatus.received, KnowledgeReport.received_at <= cutoff)
            .distinct()
        )
    )
    if jobs_finished_since is not None:
        finished = select(Job.cohort_id).where(
            Job.type == JOB_TYPE, Job.finished_at >= jobs_finished_since, Job.cohort_id.is_not(None)
        )
        cohorts |= {c for c in session.scalars(finished.distinct()) if c is not None}
    return cohorts


def _chunks(items: list[str], size: int = 1000) -> list[list[str]]:
    """`items` in lists of at most `size` (an IN list of them is one statement's parameters)."""
    return [items[i : i + size] for i in range(0, len(items), size)]
