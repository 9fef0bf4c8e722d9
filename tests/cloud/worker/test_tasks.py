"""The worker's tasks called in-process on the test database (SQLite and PostgreSQL): what each does to
the registry and which jobs it sends; garbage task arguments are dropped with a log line."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.fleet_ca import FleetCA
from cloud.pipeline import cycle
from cloud.registry import jobs, knowledge, partitions, telemetry
from cloud.registry.devices import Certificate, provision_certificate_device, revoke_device
from cloud.registry.tables import JobState, KnowledgeStatus, Telemetry, utcnow
from cloud.settings import Settings
from cloud.worker import tasks
from device_firmware_py.identity import device_key, signing_request
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model, make_report


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch, sessions: sessionmaker[Session], tmp_path: Path) -> list[uuid.UUID]:
    """The tasks run on the test database; the job ids they send are recorded instead of queued."""
    context = tasks._Context(
        settings=Settings(data_dir=tmp_path, telemetry_retention_days=1, job_lease_seconds=60),
        sessions=sessions,
        store=LocalArtifactStore(tmp_path / "artifacts"),
        owner="test-worker",
        publisher_lock=threading.Lock(),
    )
    monkeypatch.setattr(tasks, "context", lambda: context)
    queued: list[uuid.UUID] = []
    monkeypatch.setattr(tasks, "enqueue", queued.append)
    return queued


@pytest.mark.parametrize(
    "job_id", ["not-a-uuid", "", "1; DROP TABLE job", "577dc483-ee93-4a6d-9101-b2c4940c0023"]
)
def test_run_job_drops_an_id_that_names_no_job(sent: list[uuid.UUID], job_id: str) -> None:
    assert tasks.run_job.run(job_id) in {"bad id", "no such job"}


def test_schedule_cycles_starts_one_job_per_cohort_with_knowledge(
    sent: list[uuid.UUID], session: Session, tmp_path: Path
) -> None:
    # Prepare
    make_cohort(session, "kitchen")
    make_cohort(session, "porch")
    make_device(session, "cam-1", "kitchen")
    store = LocalArtifactStore(tmp_path / "a")
    teacher = make_cloud_model(session, store, "kitchen")
    base = make_edge_model(session, store, teacher_id=teacher.id, cohort_id="kitchen")
    make_report(session, "cam-1", base.id)
    session.commit()

    # Execute
    first = tasks.schedule_cycles.run()
    again = tasks.schedule_cycles.run()

    # Assert
    assert again == [] and [str(j) for j in sent] == first
    job = jobs.get_job(session, sent[0])
    assert (job.type, job.cohort_id, job.state, job.params) == (
        "rd_cycle",
        "kitchen",
        JobState.pending,
        {"trigger": "knowledge"},
    )


def test_schedule_cycles_starts_a_job_for_the_reports_a_finished_job_left_without_a_full_pass(
    sent: list[uuid.UUID], session: Session, tmp_path: Path
) -> None:
    # Prepare: kitchen's job started (the first, full, pass); a report arrives while it runs
    make_cohort(session, "kitchen")
    make_device(session, "cam-1", "kitchen")
    store = LocalArtifactStore(tmp_path / "a")
    teacher = make_cloud_model(session, store, "kitchen")
    base = make_edge_model(session, store, teacher_id=teacher.id, cohort_id="kitchen")
    make_report(session, "cam-1", base.id)
    session.commit()
    (first,) = tasks.schedule_cycles.run()
    make_report(session, "cam-1", base.id)
    session.commit()
    while_running = tasks.schedule_cycles.run()

    # Execute: the job fails, keeping the reports
    jobs.finish(session, uuid.UUID(first), state=JobState.failed, error="worker error")
    session.commit()
    after = tasks.schedule_cycles.run()

    # Assert
    assert while_running == [] and len(after) == 1 and after[0] != first
    assert not tasks.context().beat.full_due("schedule")  # the passes after the first were not full


@pytest.mark.parametrize("task", ["advance_rollouts", "reconcile_desired"])
def test_a_beat_pass_looks_at_everything_first_and_then_every_full_pass_period(
    sent: list[uuid.UUID], monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    # Prepare: the engine's pass records whether it was full; a clock the test moves
    from cloud.pipeline import rollouts

    clock = [1000.0]
    tasks.context().beat.clock = lambda: clock[0]
    passes: list[bool] = []
    failing = [False]

    def engine_pass(sessions: object, publisher: object, *, full: bool, **_: object) -> list[object] | int:
        passes.append(full)
        if failing[0]:
            raise ConnectionError("the broker went away")
        return [] if task == "advance_rollouts" else 0  # the steps, or the devices given a model

    monkeypatch.setattr(rollouts, task, engine_pass)
    run = getattr(tasks, task).run

    # Execute
    for at in (0, 10, tasks.FULL_PASS_S - 1, tasks.FULL_PASS_S, tasks.FULL_PASS_S + 1):
        clock[0] = 1000.0 + at
        run()
    failing[0] = True
    clock[0] += tasks.FULL_PASS_S
    with pytest.raises(ConnectionError):
        run()
    failing[0] = False
    run()
    run()

    # Assert: a full pass that failed is made again by the next one
    assert passes == [True, False, False, True, False, True, True, False]


def test_a_job_under_an_unknown_recipe_fails_naming_it_and_keeps_its_reports(
    sent: list[uuid.UUID], session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a due cohort, and a worker configured with a recipe that does not exist
    make_cohort(session, "kitchen")
    make_device(session, "cam-1", "kitchen")
    store = LocalArtifactStore(tmp_path / "a")
    teacher = make_cloud_model(session, store, "kitchen")
    base = make_edge_model(session, store, teacher_id=teacher.id, cohort_id="kitchen")
    msg_id = make_report(session, "cam-1", base.id)
    session.commit()
    (job_id,) = tasks.schedule_cycles.run()
    monkeypatch.setattr(tasks.context().settings, "rd_recipes", "relabel,bogus")

    # Execute
    with pytest.raises(ValueError, match="unknown RD recipe 'bogus'"):
        tasks.run_job.run(job_id)

    # Assert
    session.expire_all()
    job = jobs.get_job(session, uuid.UUID(job_id))
    assert job.state is JobState.failed and "unknown RD recipe 'bogus'" in (job.error or "")
    assert knowledge.get_report(session, msg_id).status is KnowledgeStatus.received


def test_reap_jobs_sends_again_a_job_whose_worker_died_and_gives_up_after_five(
    sent: list[uuid.UUID], session: Session
) -> None:
    # Prepare
    make_cohort(session)
    long_ago = utcnow() - timedelta(minutes=20)
    orphan = jobs.create_job(session, type="rd_cycle", cohort_id="kitchen")
    jobs.claim(session, orphan.id, owner="dead-worker", lease_s=60, now=long_ago)
    cursed = jobs.create_job(session, type="rd_cycle", cohort_id="kitchen")
    for attempt in range(5):  # each worker died; the next claimed it once the lease had run out
        when = long_ago + timedelta(minutes=2 * attempt)
        assert jobs.claim(session, cursed.id, owner=f"dead-{attempt}", lease_s=60, now=when) is not None
    session.commit()

    # Execute
    first = tasks.reap_jobs.run()
    again = tasks.reap_jobs.run()  # the job waits in the queue: not sent twice

    # Assert
    assert first == [str(orphan.id)] and again == [] and sent == [orphan.id]
    session.expire_all()
    assert jobs.get_job(session, orphan.id).lease_owner is None
    given_up = jobs.get_job(session, cursed.id)
    assert given_up.state is JobState.failed and "5 attempts" in given_up.error


def test_prune_telemetry_deletes_what_is_older_than_the_retention(
    sent: list[uuid.UUID], session: Session
) -> None:
    # Prepare
    make_cohort(session)
    make_device(session, "cam-1")
    for days in (0.5, 3):
        session.add(Telemetry(msg_id=uuid.uuid4(), device_id="cam-1", at=utcnow() - timedelta(days=days)))
    session.commit()

    # Execute
    deleted = tasks.prune_telemetry.run()

    # Assert
    assert deleted == 1
    assert len(telemetry.query_page(session, device_id="cam-1", limit=10)[0]) == 1


def test_prune_telemetry_makes_the_partitions_of_the_days_ahead(
    sent: list[uuid.UUID], session: Session
) -> None:
    # Prepare: tomorrow's partition is missing (the beat did not run)
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("telemetry is partitioned on PostgreSQL only")
    tomorrow = partitions.partition_name(utcnow().date() + timedelta(days=1))
    session.execute(text(f"DROP TABLE IF EXISTS {tomorrow}"))
    session.commit()

    # Execute
    tasks.prune_telemetry.run()

    # Assert
    assert tomorrow in partitions.attached(session)


def test_a_job_the_database_keeps_failing_is_retried_by_celery_then_failed(
    sent: list[uuid.UUID], session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a pending job whose every run finds the database gone
    make_cohort(session, "kitchen")
    job = jobs.create_job(session, type="rd_cycle", cohort_id="kitchen", params={})
    session.commit()
    runs: list[int] = []

    def database_gone(*args: object, **kwargs: object) -> None:
        runs.append(1)
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(cycle, "run_cycle_job", database_gone)
    monkeypatch.setattr(cycle, "fail_job", lambda sessions, key, *, owner, error: failed.append(error))
    failed: list[str] = []

    # Execute: eagerly, as a worker would (Celery runs the retries in place, without their countdown)
    result = tasks.run_job.apply(args=(str(job.id),))

    # Assert: the first run and MAX_ATTEMPTS retries, then the job is failed with the reason
    assert len(runs) == tasks.MAX_ATTEMPTS + 1
    assert isinstance(result.result, OperationalError)
    assert len(failed) == 1 and failed[0].startswith("database unavailable")


def test_reissue_crl_writes_the_registrys_revoked_certificates_once_a_fleet_ca_exists(
    sent: list[uuid.UUID], session: Session, tmp_path: Path
) -> None:
    # Prepare: a certificate device, revoked
    make_cohort(session)
    settings = tasks.context().settings
    none_yet = tasks.reissue_crl.run()
    ca = FleetCA.open(settings.resolved_fleet_ca_dir)
    (tmp_path / "device").mkdir()
    issued = ca.issue(signing_request(device_key(tmp_path / "device"), "cam-1"), "cam-1")
    certificate = Certificate(issued.serial, issued.sha256, issued.not_after)
    provision_certificate_device(session, device_id="cam-1", cohort_id="kitchen", certificate=certificate)
    revoke_device(session, "cam-1")
    session.commit()

    # Execute
    listed = tasks.reissue_crl.run()

    # Assert: nothing made without a CA; the CRL lists the revoked certificate
    crl = x509.load_pem_x509_crl((settings.resolved_fleet_ca_dir / "crl.pem").read_bytes())
    assert none_yet == 0 and listed == 1
    assert crl.get_revoked_certificate_by_serial_number(issued.serial) is not None
