"""The beat's passes on SQLite and PostgreSQL look only at what changed: an idle pass sends a fixed few
statements that return no row, however many devices; and a change committed while a pass runs (after it
has read what it acts on) is acted on by the next pass."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.pipeline import scheduling
from cloud.pipeline.rollouts import (
    RolloutPlan,
    advance_rollouts,
    reconcile_desired,
    request_rollback,
    start_rollout,
)
from cloud.registry import jobs, models
from cloud.registry.tables import JobState, Rollout, RolloutState, TargetState, utcnow
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model, make_report
from tests.cloud.pipeline.rollout_fleet import (
    T0,
    Fleet,
    RecordingPublisher,
    Sent,
    desired,
    kitchen_fleet,
    rollout_row,
    send_acks,
    targets,
)
from wire.messages import AckResult

ONE_WAVE = RolloutPlan(canary=0, waves=1, observe_s=0, wave_timeout_s=600)


@dataclass
class Statements:
    """The statements an engine runs, each with the rows it returned or changed."""

    seen: list[tuple[str, int]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.seen)


@contextmanager
def counted(engine: Engine) -> Iterator[Statements]:
    """Count what the engine runs inside the block."""
    found = Statements()

    def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        found.seen.append((statement, max(cursor.rowcount or 0, 0)))

    event.listen(engine, "after_cursor_execute", after)
    try:
        yield found
    finally:
        event.remove(engine, "after_cursor_execute", after)


@contextmanager
def meanwhile(engine: Engine, marker: str, change: Callable[[], None]) -> Iterator[None]:
    """Run `change` in a transaction of its own once a statement containing `marker` has run. On
    PostgreSQL it commits then, inside the pass; SQLite's pass holds the database's write lock, so
    there it commits once the pass has. Either way after the pass read what it acts on."""
    fired = threading.Event()
    worker = threading.Thread(target=change)

    def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if marker in statement and not fired.is_set():
            fired.set()
            worker.start()
            if engine.dialect.name == "postgresql":
                worker.join(30)

    event.listen(engine, "after_cursor_execute", after)
    try:
        yield
    finally:
        event.remove(engine, "after_cursor_execute", after)
        if fired.is_set():
            worker.join(30)
    assert fired.is_set(), f"no statement with {marker!r} ran"


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


def offered_wave(
    session: Session, sessions: sessionmaker[Session], store: LocalArtifactStore, devices: int
) -> tuple[Fleet, RecordingPublisher]:
    """A kitchen fleet whose one wave of v2 was offered at T0 and judged at T0 + 1 s (nobody answered)."""
    fleet = kitchen_fleet(session, store, [f"cam-{i}" for i in range(devices)])
    start_rollout(session, model_id=fleet.v2, plan=ONE_WAVE, created_by="ops")
    session.commit()
    publisher = RecordingPublisher()
    advance_rollouts(sessions, publisher, now=T0)
    assert advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=1)) == []
    return fleet, publisher


# --- advance_rollouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("devices", [2, 24])
def test_an_idle_rollout_pass_sends_one_statement_that_returns_nothing(
    session: Session, sessions: sessionmaker[Session], engine: Engine, store: LocalArtifactStore, devices: int
) -> None:
    # Prepare: a wave offered and judged; nothing changes
    _, publisher = offered_wave(session, sessions, store, devices)

    # Execute
    with counted(engine) as idle:
        steps = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2))

    # Assert
    assert steps == []
    assert (len(idle.seen), idle.rows) == (1, 0)


def test_a_rollout_is_judged_again_when_its_wave_times_out_though_nothing_changed(
    session: Session, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare: nobody answers the offer of T0
    _, publisher = offered_wave(session, sessions, store, 3)

    # Execute
    before = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=599))
    after = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=600))

    # Assert: the wave's timeout is the time set to look again; then it completes (the last wave)
    assert before == []
    assert [s.state for s in after] == [RolloutState.completed]


def test_an_ack_committed_after_a_pass_counted_the_wave_is_judged_by_the_next_pass(
    session: Session, sessions: sessionmaker[Session], engine: Engine, store: LocalArtifactStore
) -> None:
    # Prepare: two of the three devices installed; the third acks while the pass that sees the first
    # two counts the wave (that pass then waits for it, and would look again only in HEALTH_EVERY_S)
    fleet, publisher = offered_wave(session, sessions, store, 3)
    send_acks(sessions, fleet.v2, AckResult.installed, "cam-0", "cam-1")

    def third() -> None:
        send_acks(sessions, fleet.v2, AckResult.installed, "cam-2")

    # Execute
    with meanwhile(engine, "GROUP BY rollout_target.state", third):
        during = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2))
    after = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=3))

    # Assert
    assert during == []
    assert [s.state for s in after] == [RolloutState.completed]
    with sessions() as other:
        (rollout_id,) = other.scalars(select(Rollout.id))
    assert set(targets(sessions, rollout_id).values()) == {(0, TargetState.installed)}


def test_a_full_pass_looks_at_every_open_rollout(
    session: Session, sessions: sessionmaker[Session], engine: Engine, store: LocalArtifactStore
) -> None:
    # Prepare
    _, publisher = offered_wave(session, sessions, store, 2)

    # Execute
    with counted(engine) as full:
        steps = advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2), full=True)

    # Assert: it judged the wave (waiting still), which an idle pass does not
    assert steps == []
    assert len(full.seen) > 1


# --- reconcile_desired ---------------------------------------------------------------------------------


def completed_v2(
    session: Session, sessions: sessionmaker[Session], store: LocalArtifactStore, devices: int
) -> tuple[Fleet, RecordingPublisher]:
    """v2 rolled out to the whole kitchen and completed, and a reconcile pass after it."""
    fleet, publisher = offered_wave(session, sessions, store, devices)
    send_acks(sessions, fleet.v2, AckResult.installed, *fleet.device_ids)
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2))
    assert reconcile_desired(sessions, publisher) == 0
    publisher.take()
    return fleet, publisher


@pytest.mark.parametrize("devices", [2, 24])
def test_an_idle_reconcile_pass_sends_one_statement_that_returns_nothing(
    session: Session, sessions: sessionmaker[Session], engine: Engine, store: LocalArtifactStore, devices: int
) -> None:
    # Prepare
    _, publisher = completed_v2(session, sessions, store, devices)

    # Execute
    with counted(engine) as idle:
        published = reconcile_desired(sessions, publisher)

    # Assert
    assert published == 0
    assert (len(idle.seen), idle.rows) == (1, 0)


def test_a_device_that_joins_while_a_reconcile_pass_runs_gets_the_model_at_the_next_pass(
    session: Session, sessions: sessionmaker[Session], engine: Engine, store: LocalArtifactStore
) -> None:
    # Prepare: cam-new joins; cam-late joins once the pass has read the devices it gives the model
    fleet, publisher = completed_v2(session, sessions, store, 2)
    make_device(session, "cam-new")
    session.commit()

    def join() -> None:
        with sessions() as other, other.begin():
            make_device(other, "cam-late")

    # Execute
    with meanwhile(engine, "ORDER BY device.id", join):
        during = reconcile_desired(sessions, publisher)
    first = publisher.take()
    after = reconcile_desired(sessions, publisher)

    # Assert
    assert (during, first) == (1, [Sent("cam-new", fleet.v2, None)])
    assert (after, publisher.take()) == (1, [Sent("cam-late", fleet.v2, None)])
    assert desired(sessions, "cam-late") == fleet.v2


def test_a_rollback_brings_its_cohort_to_the_reconcile_pass_once(
    session: Session, sessions: sessionmaker[Session], engine: Engine, store: LocalArtifactStore
) -> None:
    # Prepare: v2 completed; a rollout of v3 to cam-0 alone completes, then is rolled back
    fleet, publisher = completed_v2(session, sessions, store, 2)
    teacher = make_cloud_model(session, store)
    v3 = make_edge_model(session, store, teacher_id=teacher.id, parent_id=fleet.v2).id
    models.decide(session, v3, approve=True)
    trial = start_rollout(session, model_id=v3, plan=ONE_WAVE, created_by="ops", device_ids=["cam-0"]).id
    session.commit()
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=3))
    send_acks(sessions, v3, AckResult.installed, "cam-0")
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=4))
    assert reconcile_desired(sessions, publisher) == 0  # cam-0 keeps v3
    request_rollback(session, trial, requested_by="ops")
    session.commit()
    advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=5))
    publisher.take()

    # Execute
    with counted(engine) as looked:
        first = reconcile_desired(sessions, publisher)
    with counted(engine) as idle:
        second = reconcile_desired(sessions, publisher)

    # Assert: the rolled-back rollout's cohort was looked at (cam-0 is back on v2 already), then not again
    assert rollout_row(sessions, trial).state is RolloutState.rolled_back
    assert (first, second) == (0, 0)
    assert len(looked.seen) > 1 and len(idle.seen) == 1
    assert desired(sessions, "cam-0") == fleet.v2


# --- schedule_cycles -----------------------------------------------------------------------------------


def scheduled(session: Session, *, full: bool = False, since: Any = None, min_reports: int = 1) -> list[str]:
    """One scheduling pass as the task makes it; the cohorts it started a job for, committed."""
    now = utcnow()
    news = scheduling.cohorts_with_news(session, max_wait_s=3600, jobs_finished_since=since, now=now)
    due = scheduling.cohorts_due(
        session, min_reports=min_reports, max_wait_s=3600, among=None if full else news, now=now
    )
    for cohort_id in due:
        scheduling.create_cycle_job(session, cohort_id=cohort_id, trigger="knowledge")
    session.commit()
    return due


def two_lines(session: Session, store: LocalArtifactStore) -> dict[str, str]:
    """Cohorts kitchen and porch, each with a device and an approved base model; their ids by cohort."""
    bases = {}
    for cohort_id in ("kitchen", "porch"):
        make_cohort(session, cohort_id)
        make_device(session, f"{cohort_id}-cam", cohort_id)
        teacher = make_cloud_model(session, store, cohort_id)
        bases[cohort_id] = make_edge_model(session, store, teacher_id=teacher.id, cohort_id=cohort_id).id
    session.commit()
    return bases


def test_an_idle_scheduling_pass_returns_no_row(
    session: Session, engine: Engine, store: LocalArtifactStore
) -> None:
    # Prepare: kitchen's report started a job, which runs
    bases = two_lines(session, store)
    make_report(session, "kitchen-cam", bases["kitchen"])
    session.commit()
    assert scheduled(session) == ["kitchen"]

    # Execute
    with counted(engine) as idle:
        due = scheduled(session, since=utcnow())

    # Assert
    assert due == []
    assert idle.rows == 0 and len(idle.seen) <= 3


def test_a_report_stored_while_a_scheduling_pass_runs_starts_a_job_at_the_next_pass(
    session: Session, sessions: sessionmaker[Session], engine: Engine, store: LocalArtifactStore
) -> None:
    # Prepare: kitchen's report is there; porch's arrives once the pass has noticed what it will
    bases = two_lines(session, store)
    make_report(session, "kitchen-cam", bases["kitchen"])
    session.commit()

    def report() -> None:
        with sessions() as other, other.begin():
            make_report(other, "porch-cam", bases["porch"])

    # Execute
    with meanwhile(engine, "SET noticed", report):
        during = scheduled(session)
    after = scheduled(session)

    # Assert
    assert (during, after) == (["kitchen"], ["porch"])


def test_reports_left_by_a_finished_job_start_the_next_one(
    session: Session, store: LocalArtifactStore
) -> None:
    # Prepare: kitchen's job started; another report arrives (noticed while the job runs); the job ends
    bases = two_lines(session, store)
    make_report(session, "kitchen-cam", bases["kitchen"])
    session.commit()
    assert scheduled(session) == ["kitchen"]
    since = utcnow()
    make_report(session, "kitchen-cam", bases["kitchen"])
    session.commit()
    assert scheduled(session, since=since) == []
    job = jobs.open_job(session, cohort_id="kitchen", type=scheduling.JOB_TYPE)
    assert job is not None
    jobs.finish(session, job.id, state=JobState.failed, error="test")
    session.commit()

    # Execute
    again = scheduled(session, since=since)

    # Assert: the finished job brings its cohort back, whose reports are still received
    assert again == ["kitchen"]


def test_a_report_that_waited_too_long_is_due_without_news(
    session: Session, store: LocalArtifactStore
) -> None:
    # Prepare: one report where two start a job; noticed, so no longer news
    bases = two_lines(session, store)
    make_report(session, "kitchen-cam", bases["kitchen"])
    session.commit()
    assert scheduled(session, min_reports=2) == []

    # Execute
    now = utcnow() + timedelta(hours=2)
    news = scheduling.cohorts_with_news(session, max_wait_s=3600, jobs_finished_since=None, now=now)
    due = scheduling.cohorts_due(session, min_reports=2, max_wait_s=3600, among=news, now=now)

    # Assert
    assert (news, due) == ({"kitchen"}, ["kitchen"])
