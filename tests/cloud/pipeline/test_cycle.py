"""RD cycle jobs on the registry: real knowledge from the device's RD code → a gated, registered model,
under a lease; a job run again after its worker died makes one model and consumes every report once."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import ConflictError
from cloud.ml.cycle import EdgeLine
from cloud.ml.data import ScenarioData
from cloud.ml.nets import NetSpec
from cloud.ml.scenario import Scenario
from cloud.pipeline import cycle
from cloud.pipeline.lines import register_line
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
from device_firmware_py.rd import extract_knowledge
from tests.cloud.factories import make_cohort, make_device

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
    small_data: ScenarioData,
    small_scenario: Scenario,
) -> str:
    """Cohort `base` with its first version registered and approved, and one device on it."""
    with transaction(sessions) as session:
        make_cohort(session, "base")
        make_device(session, "cam-1", "base")
        make_device(session, "cam-2", "base")
        cloud, edge = register_line(session, store, base_line, NetSpec(num_classes=small_data.num_classes))
        cloud.metrics = {cycle.TRAINING_DATA: json.loads(small_scenario.model_dump_json())}
        models.decide(session, edge.id, approve=True)
        return edge.id


def _report(
    sessions: sessionmaker[Session], base_line: EdgeLine, data: ScenarioData, device_id: str, seed: int
) -> uuid.UUID:
    """A real knowledge report of user dana (3 → 8) from her private pool, stored as the ingest does."""
    pool = data.users[0].device_train[0]
    report = extract_knowledge(base_line.artifact.load(), pool.x, pool.y, device_id=device_id, seed=seed)
    with transaction(sessions) as session:
        stored = knowledge.store_report(session, report.to_bytes())
        assert stored is not None
        return stored.msg_id


def _job(sessions: sessionmaker[Session]) -> uuid.UUID:
    with transaction(sessions) as session:
        return cycle.create_cycle_job(session, cohort_id="base", trigger="test").id


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
        assert cycle.TRAINING_DATA in models.get_model(session, "base.cloud.v2").metrics
        reports = session.scalars(select(KnowledgeReport)).all()
        assert {r.msg_id for r in reports} == msg_ids
        assert {(r.status, r.job_id) for r in reports} == {(KnowledgeStatus.consumed, job_id)}
        job = jobs.get_job(session, job_id)
        assert (job.state, job.progress, job.lease_owner) == (JobState.succeeded, 1.0, None)
        assert job.result["outcome"] == "approved" and job.result["models"] == ["base.cloud.v2", "base.v2"]
        assert sorted(job.result["reports"]) == sorted(map(str, msg_ids))


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
        assert [j.id for j in jobs.stale_jobs(session)] == [job_id]

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
    pool = small_data.users[1].device_train[0]
    report = extract_knowledge(base_line.artifact.load(), pool.x, pool.y, device_id="cam-1", seed=0)
    with transaction(sessions) as session:
        knowledge.store_report(session, report.to_bytes())
    job_id = _job(sessions)

    # Execute
    outcome = cycle.run_cycle_job(sessions, store, job_id, owner="worker-a", lease_s=LEASE_S)

    # Assert
    assert (outcome.outcome, outcome.edge_model_id) == ("no-op", None)
    with sessions() as session:
        assert session.scalars(select(Model.id).where(Model.version == 2)).all() == []
        assert knowledge.get_report(session, report.msg_id).status is KnowledgeStatus.consumed
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
        assert cycle.cohorts_due(session, min_reports=2, max_wait_s=3600) == []
        assert cycle.cohorts_due(session, min_reports=1, max_wait_s=3600) == ["base"]
        assert cycle.cohorts_due(session, min_reports=5, max_wait_s=0.0) == ["base"]
        cycle.create_cycle_job(session, cohort_id="base", trigger="test")
        assert cycle.cohorts_due(session, min_reports=1, max_wait_s=3600) == []
        with pytest.raises(ConflictError, match="already has pending job"):
            cycle.create_cycle_job(session, cohort_id="base", trigger="test")
        assert session.scalars(select(Job)).one().params == {"trigger": "test"}
