"""RD cycle jobs on the registry: real knowledge from the device's RD code → a gated, registered model,
under a lease; a job run again after its worker died makes one model and consumes every report once."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import ConflictError
from cloud.ml.data import ScenarioData
from cloud.ml.line import EdgeLine
from cloud.ml.scenario import Scenario
from cloud.pipeline import cycle, scheduling
from cloud.registry import jobs, knowledge, models
from cloud.registry.db import transaction
from cloud.registry.tables import (
    Job,
    JobState,
    KnowledgeReport,
    KnowledgeStatus,
    Model,
    ModelKind,
    ModelStatus,
    utcnow,
)
from tests.cloud.lines import report_knowledge, ship_line

pytestmark = pytest.mark.slow
LEASE_S = 60.0


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def shipped_line(
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    base_line: EdgeLine,
    small_scenario: Scenario,
) -> str:
    """Cohort `base` with its first version registered and approved, and two devices on it."""
    return ship_line(sessions, store, base_line, small_scenario)


def _report(
    sessions: sessionmaker[Session], base_line: EdgeLine, data: ScenarioData, device_id: str, seed: int
) -> uuid.UUID:
    """A real knowledge report of user dana (3 → 8) from her private pool."""
    return report_knowledge(sessions, base_line, data, device_id, seed=seed)


def _job(sessions: sessionmaker[Session]) -> uuid.UUID:
    with transaction(sessions) as session:
        return scheduling.create_cycle_job(session, cohort_id="base", trigger="test").id


def test_knowledge_becomes_an_approved_model_with_its_lineage(
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    shipped_line: str,
    base_line: EdgeLine,
    small_data: ScenarioData,
) -> None:
    # Prepare
    msg_ids = {_report(sessions, base_line, small_data, "cam-1", 0)}
    job_id = _job(sessions)

    # Execute
    outcome = cycle.run_cycle_job(sessions, store, job_id, owner="worker-a", lease_s=LEASE_S)

    # Assert
    assert (outcome.outcome, outcome.edge_model_id, outcome.cloud_model_id) == (
        "approved",
        "base.v2",
        "base.cloud.v2",
    )
    with sessions() as session:
        edge = models.get_model(session, "base.v2")
        assert (edge.status, edge.parent_id, edge.teacher_id, edge.job_id) == (
            ModelStatus.approved,
            shipped_line,
            "base.cloud.v2",
            job_id,
        )
        assert scheduling.TRAINING_DATA in models.get_model(session, "base.cloud.v2").metrics
        reports = session.scalars(select(KnowledgeReport)).all()
        assert {r.msg_id for r in reports} == msg_ids
        assert {(r.status, r.job_id) for r in reports} == {(KnowledgeStatus.consumed, job_id)}
        job = jobs.get_job(session, job_id)
        assert (job.state, job.progress, job.lease_owner) == (JobState.succeeded, 1.0, None)
        assert job.result["outcome"] == "approved" and job.result["models"] == ["base.cloud.v2", "base.v2"]
        assert sorted(job.result["reports"]) == sorted(map(str, msg_ids))
        statuses = [c["status"] for c in job.result["candidates"]]
        assert statuses.count("chosen") == 1, job.result["candidates"]
        chosen = next(c for c in job.result["candidates"] if c["status"] == "chosen")
        assert job.result["export"] == chosen["export"]
        for c in job.result["candidates"]:  # how each trained candidate was quantized; a relabel is not
            assert bool(c["export"]) is (c["recipe"] != "relabel"), c


def test_a_job_whose_worker_died_runs_again_once(
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    shipped_line: str,
    base_line: EdgeLine,
    small_data: ScenarioData,
) -> None:
    # Prepare: worker-a claimed the job and died; its lease ran out
    msg_id = _report(sessions, base_line, small_data, "cam-1", 0)
    job_id = _job(sessions)
    with transaction(sessions) as session:
        jobs.claim(session, job_id, owner="worker-a", lease_s=LEASE_S, now=utcnow() - timedelta(minutes=5))
        assert [j.id for j in jobs.stale_jobs(session, types=[scheduling.JOB_TYPE])] == [job_id]

    # Execute
    first = cycle.run_cycle_job(sessions, store, job_id, owner="worker-b", lease_s=LEASE_S)
    again = cycle.run_cycle_job(sessions, store, job_id, owner="worker-c", lease_s=LEASE_S)

    # Assert
    assert first.outcome == "approved" and again.outcome == "skipped"
    with sessions() as session:
        edges = session.scalars(select(Model.id).where(Model.kind == ModelKind.edge)).all()
        assert sorted(edges) == ["base.v1", "base.v2"]
        assert knowledge.get_report(session, msg_id).status is KnowledgeStatus.consumed
        assert jobs.get_job(session, job_id).attempts == 2


def test_knowledge_that_changes_no_decision_is_a_no_op(
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    shipped_line: str,
    base_line: EdgeLine,
    small_data: ScenarioData,
) -> None:
    # Prepare: user eve agrees with the manufacturer
    msg_id = report_knowledge(sessions, base_line, small_data, "cam-1", user=1)
    job_id = _job(sessions)

    # Execute
    outcome = cycle.run_cycle_job(sessions, store, job_id, owner="worker-a", lease_s=LEASE_S)

    # Assert
    assert (outcome.outcome, outcome.edge_model_id) == ("no-op", None)
    with sessions() as session:
        assert session.scalars(select(Model.id).where(Model.version == 2)).all() == []
        assert knowledge.get_report(session, msg_id).status is KnowledgeStatus.consumed
        assert jobs.get_job(session, job_id).result["outcome"] == "no-op"


def test_reports_on_a_model_that_never_shipped_are_discarded(
    sessions: sessionmaker[Session], store: LocalArtifactStore, shipped_line: str, small_data: ScenarioData
) -> None:
    # Prepare: the device reports against a model that was rejected
    with transaction(sessions) as session:
        edge = models.get_model(session, shipped_line)
        edge.status = ModelStatus.rejected
    msg_id = uuid.uuid4()
    with transaction(sessions) as session:
        session.add(
            KnowledgeReport(
                msg_id=msg_id,
                device_id="cam-1",
                base_model_id=shipped_line,
                schema="diredi.knowledge/1",
                size_bytes=3,
                sample_count=100,
                sent_at=utcnow(),
                payload=b"{}",
            )
        )
    job_id = _job(sessions)

    # Execute
    outcome = cycle.run_cycle_job(sessions, store, job_id, owner="worker-a", lease_s=LEASE_S)

    # Assert
    assert outcome.outcome == "no-op"
    with sessions() as session:
        report = knowledge.get_report(session, msg_id)
        assert report.status is KnowledgeStatus.discarded
        assert "never shipped" in report.status_reason


def test_a_cohort_has_one_open_cycle_job_and_is_due_by_count_or_age(
    sessions: sessionmaker[Session], shipped_line: str, base_line: EdgeLine, small_data: ScenarioData
) -> None:
    # Prepare
    _report(sessions, base_line, small_data, "cam-1", 0)

    # Execute / Assert
    with transaction(sessions) as session:
        assert scheduling.cohorts_due(session, min_reports=2, max_wait_s=3600) == []
        assert scheduling.cohorts_due(session, min_reports=1, max_wait_s=3600) == ["base"]
        assert scheduling.cohorts_due(session, min_reports=5, max_wait_s=0.0) == ["base"]
        scheduling.create_cycle_job(session, cohort_id="base", trigger="test")
        assert scheduling.cohorts_due(session, min_reports=1, max_wait_s=3600) == []
        with pytest.raises(ConflictError, match="already has pending job"):
            scheduling.create_cycle_job(session, cohort_id="base", trigger="test")
        assert session.scalars(select(Job)).one().params == {"trigger": "test"}
