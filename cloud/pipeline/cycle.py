"""An RD cycle job, as a worker runs it (it loads the ML: what the API and the beat need of jobs is in
`scheduling.py`): a cohort's `received` knowledge → RD update → re-KD → int8 export → gate → a
registered model (`approved` or `rejected`, with the reason) or a no-op, under the job's lease.

The job takes its lease, reads what it needs, and trains with no transaction open. Everything it
decides is written at the end in one transaction that first checks it still holds the lease: models,
the reports it consumed, the job's outcome. A worker killed at any point before that commit leaves
the reports `received` and no model behind; the job is run again by whoever claims it next, and a
worker that lost its lease (it was presumed dead) cannot commit a second model.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import ArtifactStore
from cloud.exceptions import KnowledgeError, LeaseLost
from cloud.ml.cycle import CycleResult, rd_cycle
from cloud.ml.data import build_scenario_data
from cloud.ml.families import NetSpec
from cloud.ml.line import plan_for
from cloud.ml.rd_update import RDConfig
from cloud.ml.recipes import search_of
from cloud.ml.scenario import parse_scenario
from cloud.pipeline.lines import load_line, register_line
from cloud.pipeline.scheduling import JOB_TYPE, TRAINING_DATA
from cloud.registry import jobs, knowledge, models
from cloud.registry.db import transaction
from cloud.registry.tables import (
    Device,
    Job,
    JobState,
    KnowledgeReport,
    KnowledgeStatus,
    Model,
    ModelStatus,
)
from wire.errors import ContractError

log = logging.getLogger(__name__)

SHIPPABLE = (ModelStatus.approved, ModelStatus.retired)

# Where each stage of the cycle starts and ends in the job's overall progress.
STAGES: dict[str, tuple[float, float]] = {
    "teacher": (0.05, 0.25),
    "relabel": (0.25, 0.95),
    "re-KD": (0.25, 0.85),
    "export": (0.85, 0.95),
}


@dataclass(frozen=True)
class CycleOutcome:
    """What a job made: `approved`, `rejected`, `no-op`, or `skipped` (the job was not ours to run)."""

    job_id: uuid.UUID
    outcome: str
    reason: str = ""
    edge_model_id: str | None = None
    cloud_model_id: str | None = None
    reports: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Knowledge:
    parent_id: str
    msg_ids: list[uuid.UUID]
    payloads: list[bytes]


def _select_knowledge(session: Session, job: Job) -> _Knowledge | str:
    """The received reports this job uses, all against one base model: the newest shippable edge model
    any of them was computed on. Reports against an older model, or one that never shipped, are
    discarded with the reason. A string says why there is nothing to do."""
    rows = session.execute(
        select(KnowledgeReport, Model)
        .join(Device, Device.id == KnowledgeReport.device_id)
        .join(Model, Model.id == KnowledgeReport.base_model_id)
        .where(Device.cohort_id == job.cohort_id, KnowledgeReport.status == KnowledgeStatus.received)
        .order_by(KnowledgeReport.received_at, KnowledgeReport.msg_id)
    ).all()
    usable = [(report, base) for report, base in rows if base.status in SHIPPABLE]
    newest = max((base.version for _, base in usable), default=None)
    for report, base in rows:
        if base.status not in SHIPPABLE:
            report.status, report.job_id = KnowledgeStatus.discarded, job.id
            report.status_reason = f"base model {base.id} is {base.status.value}, it never shipped"
        elif base.version != newest:
            report.status, report.job_id = KnowledgeStatus.discarded, job.id
            report.status_reason = f"computed on {base.id}; the cohort's knowledge is now on version {newest}"
    chosen = [report for report, base in usable if base.version == newest]
    if not chosen:
        return "no received knowledge on a shipped model of the cohort"
    payloads = session.scalars(
        select(KnowledgeReport.payload).where(KnowledgeReport.msg_id.in_([r.msg_id for r in chosen]))
    ).all()
    return _Knowledge(chosen[0].base_model_id, [r.msg_id for r in chosen], list(payloads))


class _Lease:
    """Renews the job's lease on a thread of its own while the work runs (training holds the GIL only
    in short stretches), and writes progress at most every `every` seconds."""

    def __init__(
        self, sessions: sessionmaker[Session], job_id: uuid.UUID, owner: str, lease_s: float, every: float
    ) -> None:
        self.sessions, self.job_id, self.owner, self.lease_s, self.every = (
            sessions,
            job_id,
            owner,
            lease_s,
            every,
        )
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._progress: tuple[float, str] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def progress(self, value: float, stage: str) -> None:
        with self._lock:
            self._progress = (value, stage)

    def _flush(self) -> None:
        with self._lock:
            pending, self._progress = self._progress, None
        with transaction(self.sessions) as session:
            if not jobs.renew(session, self.job_id, owner=self.owner, lease_s=self.lease_s):
                self.lost.set()
                return
            if pending is not None:
                jobs.report_progress(
                    session, self.job_id, progress=pending[0], stage=pending[1], owner=self.owner
                )

    def _run(self) -> None:
        renew_every = min(self.every, self.lease_s / 3)
        while not self._stop.wait(renew_every):
            try:
                self._flush()
            except Exception:  # a database hiccup: the next renewal tries again
                log.exception("job %s: could not renew its lease", self.job_id)

    @contextmanager
    def held(self) -> Iterator[_Lease]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def _stage_progress(lease: _Lease) -> Callable[[str, int, int], None]:
    def progress(stage: str, done: int, total: int) -> None:
        start, end = STAGES.get(stage, (0.05, 0.95))
        lease.progress(start + (end - start) * (done / total if total else 1.0), stage)

    return progress


def run_cycle_job(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    job_id: uuid.UUID,
    *,
    owner: str,
    lease_s: float,
    progress_every: float = 2.0,
    recipes: str | None = None,
) -> CycleOutcome:
    """Run (or run again) one RD cycle job; see the module's docstring for what survives a crash.

    `recipes` names the candidate search's recipes (`Settings.rd_recipes`; None: the default)."""

    search = search_of(recipes) if recipes is not None else None  # a bad name fails before any claim
    with transaction(sessions) as session:
        if jobs.get_job(session, job_id).type != JOB_TYPE:  # never claim another kind of job
            return CycleOutcome(job_id, "skipped", f"not an {JOB_TYPE} job")
        job = jobs.claim(session, job_id, owner=owner, lease_s=lease_s)
        if job is None:
            return CycleOutcome(job_id, "skipped", "finished, or leased to a live worker")
        if job.cohort_id is None:
            jobs.finish(
                session, job_id, state=JobState.failed, error="an RD cycle needs a cohort", owner=owner
            )
            return CycleOutcome(job_id, "failed", "an RD cycle needs a cohort")
        jobs.report_progress(session, job_id, progress=0.0, stage="select knowledge", owner=owner)
        chosen = _select_knowledge(session, job)
        if isinstance(chosen, str):
            jobs.finish(
                session,
                job_id,
                state=JobState.succeeded,
                result={"outcome": "no-op", "reason": chosen},
                owner=owner,
            )
            return CycleOutcome(job_id, "no-op", chosen)
        parent = models.get_model(session, chosen.parent_id)
        line, spec = load_line(session, store, parent.id)
        teacher = models.get_model(session, str(parent.teacher_id))  # load_line checked there is one
        training_data = teacher.metrics.get(TRAINING_DATA)
        if training_data is None:
            raise KnowledgeError(f"cloud model {teacher.id} does not record the data it was trained on")

    started = time.perf_counter()
    scenario = parse_scenario(json.dumps(training_data), source=f"{teacher.id} training data")
    data = build_scenario_data(scenario)
    lease = _Lease(sessions, job_id, owner, lease_s, progress_every)
    try:
        with lease.held():
            result = rd_cycle(
                line,
                chosen.payloads,
                data.train,
                data.val,
                plan_for(spec, scenario.seed),
                RDConfig(),
                search=search,
                progress=_stage_progress(lease),
            )
    except (KnowledgeError, ContractError) as exc:  # the reports themselves are unusable
        _refuse(sessions, job_id, owner, chosen, f"{type(exc).__name__}: {exc}")
        return CycleOutcome(job_id, "failed", str(exc), reports=[str(m) for m in chosen.msg_ids])
    if lease.lost.is_set():
        raise LeaseLost(f"job {job_id} lost its lease while it ran; its result is not registered")
    return _record(
        sessions, store, job_id, owner, chosen, result, spec, training_data, time.perf_counter() - started
    )


@contextmanager
def _fenced(sessions: sessionmaker[Session], job_id: uuid.UUID, owner: str) -> Iterator[Session]:
    """A transaction that goes on only while `owner` still holds the job's lease."""
    with transaction(sessions) as session:
        job = jobs.get_job(session, job_id, for_update=True)
        if job.state is not JobState.running or job.lease_owner != owner:
            raise LeaseLost(f"job {job_id} is no longer leased to {owner}; its result is not registered")
        yield session


def _refuse(
    sessions: sessionmaker[Session], job_id: uuid.UUID, owner: str, chosen: _Knowledge, error: str
) -> None:
    """The reports cannot be combined or used: they are discarded with the reason, the job failed."""
    with _fenced(sessions, job_id, owner) as session:
        for row in session.scalars(select(KnowledgeReport).where(KnowledgeReport.msg_id.in_(chosen.msg_ids))):
            row.status, row.job_id, row.status_reason = KnowledgeStatus.discarded, job_id, error[:2000]
        jobs.finish(session, job_id, state=JobState.failed, error=error[:2000], owner=owner)
    log.warning("job %s: knowledge refused: %s", job_id, error)


def _record(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    job_id: uuid.UUID,
    owner: str,
    chosen: _Knowledge,
    result: CycleResult,
    spec: NetSpec,
    training_data: dict[str, Any],
    elapsed: float,
) -> CycleOutcome:
    """Register what the cycle made, consume its reports and finish the job, in one transaction."""

    reports = [str(m) for m in chosen.msg_ids]
    summary: dict[str, Any] = {
        "outcome": result.outcome,
        "reason": result.reason,
        "parent": chosen.parent_id,
        "reports": reports,
        "moved_transfer_samples": result.moved_transfer_samples,
        "timings_s": {**result.timings_s, "total": elapsed},
        "candidates": [c.as_dict() for c in result.candidates],  # every recipe tried, chosen or not
    }
    if result.candidate is not None:
        summary["export"] = [a.as_dict() for a in result.candidate.export]
    if result.verdict is not None:
        summary["gate"] = result.verdict.as_dict()
    cloud_id = edge_id = None
    with _fenced(sessions, job_id, owner) as session:
        knowledge.consume(session, chosen.msg_ids, job_id=job_id)
        # No candidate: a no-op, or every candidate's int8 export gave up (rejected, nothing to register)
        if result.candidate is not None:
            metrics = {"gate": summary.get("gate", {}), "reason": result.reason, "reports": len(reports)}
            cloud, edge = register_line(
                session,
                store,
                result.candidate,
                spec,
                job_id=job_id,
                parent=models.get_model(session, chosen.parent_id),
                metrics=metrics,
            )
            cloud.metrics = {**cloud.metrics, TRAINING_DATA: training_data}
            models.decide(session, edge.id, approve=result.outcome == "approved", reason=result.reason)
            cloud_id, edge_id = cloud.id, edge.id
            summary["models"] = [cloud.id, edge.id]
        jobs.finish(session, job_id, state=JobState.succeeded, result=summary, owner=owner)
    log.info(
        "job %s: %s (%s) from %d reports in %.1f s",
        job_id,
        result.outcome,
        result.reason,
        len(reports),
        elapsed,
    )
    return CycleOutcome(job_id, result.outcome, result.reason, edge_id, cloud_id, reports)


def fail_job(sessions: sessionmaker[Session], job_id: uuid.UUID, *, owner: str, error: str) -> None:
    """Record that a job failed for good, whoever holds its lease (its worker gave up retrying); its
    reports stay `received` for the next job."""
    with transaction(sessions) as session:
        job = jobs.get_job(session, job_id, for_update=True)
        if job.state not in jobs.FINISHED:
            jobs.finish(session, job_id, state=JobState.failed, error=error[:2000])
    log.error("job %s failed (%s): %s", job_id, owner, error)
