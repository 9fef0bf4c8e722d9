"""`diredi worker` as a real process on Redis and PostgreSQL: received knowledge becomes an approved model,
and a worker killed with SIGKILL in the middle of a job leaves it to be completed once by the next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.ml.data import ScenarioData
from cloud.ml.line import EdgeLine
from cloud.ml.scenario import Scenario
from cloud.registry import jobs, knowledge, migrate
from cloud.registry.db import make_engine, session_factory
from cloud.registry.tables import Job, JobState, KnowledgeStatus, Model, ModelKind, ModelStatus
from tests.cloud.lines import report_knowledge, ship_line
from tests.databases import postgres_admin_url
from tests.polling import wait_until
from tests.redis_server import running_redis
from testsupport.postgres import scratch_database

pytestmark = pytest.mark.slow
LEASE_S = 10  # short, so a dead worker's job is taken up again quickly
DIREDI = Path(sys.executable).parent / "diredi"


@dataclass
class Cloud:
    """A migrated PostgreSQL registry, a Redis queue and the data directory the worker shares."""

    sessions: sessionmaker[Session]
    store: LocalArtifactStore
    env: dict[str, str]
    logs: Path


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    with (
        scratch_database(postgres_admin_url(), prefix="diredi_worker") as database_url,
        running_redis(tmp_path / "redis") as redis_url,
    ):
        engine = make_engine(database_url)
        migrate.upgrade(engine)
        data_dir = tmp_path / "data"
        env = {
            **os.environ,
            "DIREDI_DATA_DIR": str(data_dir),
            "DIREDI_DATABASE_URL": database_url,
            "DIREDI_REDIS_URL": redis_url,
            "DIREDI_JOB_LEASE_SECONDS": str(LEASE_S),
            "DIREDI_PIPELINE_AUTO_ROLLOUT": "false",
            "DIREDI_WORKER_METRICS_PORT": "0",
        }
        yield Cloud(session_factory(engine), LocalArtifactStore(data_dir / "artifacts"), env, tmp_path)
        engine.dispose()


class Worker:
    """`diredi worker --beat` in a session of its own (so SIGKILL reaches every process of it)."""

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud
        self.runs = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        self.runs += 1
        with (self.cloud.logs / f"worker-{self.runs}.log").open("wb") as log:
            self.process = subprocess.Popen(
                [str(DIREDI), "worker", "--beat", "--name", f"w{self.runs}"],
                env=self.cloud.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def log(self) -> str:
        return "\n".join(
            (self.cloud.logs / f"worker-{n}.log").read_text(errors="replace")[-3000:]
            for n in range(1, self.runs + 1)
        )


@pytest.fixture
def worker(cloud: Cloud) -> Iterator[Worker]:
    running = Worker(cloud)
    yield running
    if running.process is not None:
        running.stop()


def _cycle_job(sessions: sessionmaker[Session]) -> Job | None:
    with sessions() as session:
        return session.scalars(select(Job).where(Job.type == "rd_cycle")).first()


def _edge_models(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        return sorted(session.scalars(select(Model.id).where(Model.kind == ModelKind.edge)))


def test_received_knowledge_becomes_an_approved_model(
    cloud: Cloud,
    worker: Worker,
    base_line: EdgeLine,
    small_data: ScenarioData,
    small_scenario: Scenario,
) -> None:
    # Prepare
    ship_line(cloud.sessions, cloud.store, base_line, small_scenario)
    msg_id = report_knowledge(cloud.sessions, base_line, small_data, "cam-1")

    # Execute: the beat finds the cohort due and starts the job; the worker runs it
    worker.start()
    wait_until(
        lambda: (job := _cycle_job(cloud.sessions)) is not None and job.state is JobState.succeeded,
        300,
        worker.log,
    )

    # Assert
    job = _cycle_job(cloud.sessions)
    assert job is not None and job.result["outcome"] == "approved", job.result if job else None
    assert job.params["trigger"] == "knowledge"
    with cloud.sessions() as session:
        assert knowledge.get_report(session, msg_id).status is KnowledgeStatus.consumed
        assert session.get_one(Model, "base.v2").status is ModelStatus.approved
    assert worker.stop() == 0, worker.log()


def test_a_job_whose_worker_is_killed_completes_once(
    cloud: Cloud,
    worker: Worker,
    base_line: EdgeLine,
    small_data: ScenarioData,
    small_scenario: Scenario,
    record_property: Callable[[str, object], None],
) -> None:
    # Prepare: the worker is killed while the job trains (re-KD: relabelling is over in seconds)
    cloud.env["DIREDI_RD_RECIPES"] = "re-KD"
    ship_line(cloud.sessions, cloud.store, base_line, small_scenario)
    msg_id = report_knowledge(cloud.sessions, base_line, small_data, "cam-1")
    worker.start()
    wait_until(
        lambda: (job := _cycle_job(cloud.sessions)) is not None and job.progress >= 0.3, 300, worker.log
    )
    worker.kill()
    killed_at = time.monotonic()
    job = _cycle_job(cloud.sessions)
    assert job is not None and job.state is JobState.running
    assert _edge_models(cloud.sessions) == ["base.v1"]

    # Execute
    worker.start()
    wait_until(
        lambda: (job := _cycle_job(cloud.sessions)) is not None and job.state is JobState.succeeded,
        300,  # the bound: within 5 minutes of the kill
        worker.log,
    )
    record_property("completed_after_kill_s", round(time.monotonic() - killed_at, 1))

    # Assert
    job = _cycle_job(cloud.sessions)
    assert job is not None and job.attempts == 2 and job.result["outcome"] == "approved"
    assert job.result["reports"] == [str(msg_id)]
    assert _edge_models(cloud.sessions) == ["base.v1", "base.v2"]
    with cloud.sessions() as session:
        report = knowledge.get_report(session, msg_id)
        assert (report.status, report.job_id) == (KnowledgeStatus.consumed, job.id)
        assert jobs.list_jobs(session, limit=10, offset=0)[1] == 1
