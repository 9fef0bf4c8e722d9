"""The pipeline's tasks: each a thin, idempotent call into `cloud.pipeline`, safe to deliver twice.

`run_job` runs a job under its lease (a second delivery finds it finished or leased and does nothing);
the periodic tasks (see `cloud.worker.app.BEAT`) start jobs for cohorts with knowledge waiting, send
again the jobs whose worker died, advance rollouts, send online devices their pending commands, give
devices their cohort's model, distribute the trust chain of the signing keys, make the broker reflect the
registry, and prune telemetry.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, Protocol

from celery import Task
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.broker_hook import BrokerCredentialHook, crl_from_settings, hook_from_settings, reconcile
from cloud.exceptions import ConflictError, HookError, LeaseLost, NotFoundError, PublishError
from cloud.pipeline import scheduling
from cloud.publisher import CloudPublisher
from cloud.registry import commands, jobs, partitions, telemetry
from cloud.registry.db import make_engine, session_factory, transaction
from cloud.registry.devices import behind_on_trust
from cloud.registry.tables import JobState, utcnow
from cloud.settings import Settings
from cloud.signing import Desired, KeyRing
from cloud.worker.app import app
from wire.messages import CommandName

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # a job claimed this many times without finishing is failed for good
REQUEUE_HOLD_S = 120.0  # a job sent again is not sent again for this long while it waits in the queue
BROKER_SWEEP_S = 600.0  # how often the broker is compared whole with the registry
# The beat's passes look at what changed (cloud/pipeline); this often, and first in each process, one
# looks at everything instead: a safety net for a change no flag or time recorded.
FULL_PASS_S = 600.0
# How far before its last pass schedule_cycles looks for finished jobs: a job's final transaction may
# commit after a pass that began after its `finished_at` (and the workers' clocks may differ).
JOBS_OVERLAP = timedelta(seconds=60)

METRICS = CollectorRegistry()
JOBS = Counter("diredi_worker_jobs", "Jobs run, by outcome.", ["type", "outcome"], registry=METRICS)
JOB_SECONDS = Histogram(
    "diredi_worker_job_seconds",
    "Wall time of a job run, by outcome.",
    ["type", "outcome"],
    buckets=(1, 5, 10, 20, 30, 45, 60, 90, 120, 300, 600, 1800),
    registry=METRICS,
)
REQUEUED = Counter(
    "diredi_worker_jobs_requeued", "Jobs sent again after their worker died.", registry=METRICS
)
PUBLISHED = Counter(
    "diredi_worker_desired_published", "Desired models published to devices.", ["reason"], registry=METRICS
)


@dataclass
class _Beat:
    """What the beat's passes run by this process remember between passes: when each last looked at
    everything, and when schedule_cycles' last pass began. Lost on a restart: the next passes then
    look at everything."""

    full_at: dict[str, float] = field(default_factory=dict)  # `clock` time, by task
    scheduled_at: datetime | None = None
    clock: Callable[[], float] = time.monotonic

    def full_due(self, task: str) -> bool:
        """Whether the task's next pass looks at everything."""
        last = self.full_at.get(task)
        return last is None or self.clock() - last >= FULL_PASS_S

    def full_done(self, task: str, began: float) -> None:
        self.full_at[task] = began


@dataclass
class _Context:
    """What the tasks of one worker process share: settings, registry, store and the broker link."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: LocalArtifactStore
    owner: str
    publisher_lock: threading.Lock
    publisher: CloudPublisher | None = None
    trust_published: int | None = None  # the trust version this process last published
    broker_hook: BrokerCredentialHook | None = None
    last_sweep: float | None = None  # monotonic time of the broker reconciler's last full sweep
    beat: _Beat = field(default_factory=_Beat)

    def publish(self) -> CloudPublisher:
        """The worker's connection to the broker, opened on first use and again after an error."""
        if self.publisher is None:
            from broker.client import BrokerTarget
            from cloud.signing import KeyRing

            target = BrokerTarget.parse(
                self.settings.mqtt_url.get_secret_value(), ca_file=self.settings.mqtt_ca_file
            )
            keyring = KeyRing.open(self.settings.resolved_signing_key_dir)
            publisher = CloudPublisher(target, keyring, client_id=self.settings.mqtt_client_id)
            self.publisher = publisher.__enter__()
        return self.publisher

    def drop_publisher(self) -> None:
        if self.publisher is not None:
            try:
                self.publisher.__exit__(None, None, None)
            except Exception:  # already broken; a new one is opened on the next use
                log.debug("closing a broken publisher", exc_info=True)
            self.publisher = None


@cache
def context() -> _Context:
    """This process's context, made on the first task (after the worker forked, if it does)."""
    settings = Settings()
    return _Context(
        settings=settings,
        sessions=session_factory(make_engine(settings.resolved_database_url)),
        store=LocalArtifactStore(settings.resolved_artifact_dir),
        owner=f"{socket.gethostname()}:{os.getpid()}",
        publisher_lock=threading.Lock(),
    )


class _Publisher:
    """The engine's DesiredPublisher (counting what it publishes) and `send_commands`' CommandPublisher."""

    def __init__(self, ctx: _Context, reason: str) -> None:
        self.ctx, self.reason = ctx, reason

    def publish_desired_many(self, wanted: Sequence[Desired]) -> object:
        documents = self.ctx.publish().publish_desired_many(wanted)
        rollbacks = sum(1 for desired in wanted if desired.rollback_of)
        PUBLISHED.labels("rollback").inc(rollbacks)
        PUBLISHED.labels(self.reason).inc(len(wanted) - rollbacks)
        return documents

    def send_command(
        self, device_id: str, command: CommandName, *, msg_id: uuid.UUID | None, expires_at: datetime | None
    ) -> object:
        return self.ctx.publish().send_command(device_id, command, msg_id=msg_id, expires_at=expires_at)


_ML = threading.Lock()  # one training at a time per worker process: they would fight for the cores


@app.task(
    name="diredi.run_job",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    # The database went away: Celery sends the job again later, 5 s, 10 s, 20 s... (at most 5 min,
    # with jitter), MAX_ATTEMPTS times.
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=MAX_ATTEMPTS,
)
def run_job(self: Task[Any, Any], job_id: str) -> str:
    """Run one pipeline job (an RD cycle) under its lease; start its rollout if the model is approved."""
    try:
        key = uuid.UUID(job_id)
    except (ValueError, TypeError):
        log.error("run_job: %r is not a job id; dropped", job_id)
        return "bad id"
    ctx = context()
    with _ML, JOB_SECONDS.labels(scheduling.JOB_TYPE, "any").time():
        # Imported here, by the first job: a worker starts (and `diredi up` with it) without PyTorch,
        # ~1.8 s of CPU less per start, and the thread count is the running thread's (OpenMP).
        import torch

        from cloud.pipeline import cycle

        torch.set_num_threads(ctx.settings.worker_torch_threads)
        try:
            outcome = cycle.run_cycle_job(
                ctx.sessions,
                ctx.store,
                key,
                owner=ctx.owner,
                lease_s=ctx.settings.job_lease_seconds,
                recipes=ctx.settings.rd_recipes,
            )
        except NotFoundError:
            log.error("run_job: no job %s; dropped", job_id)
            return "no such job"
        except LeaseLost as exc:
            log.warning("%s", exc)
            JOBS.labels(scheduling.JOB_TYPE, "lease-lost").inc()
            return "lease lost"
        except OperationalError as exc:  # retried by Celery (autoretry_for), the lease given up first
            _release(ctx, key)
            if self.request.retries >= MAX_ATTEMPTS:
                cycle.fail_job(ctx.sessions, key, owner=ctx.owner, error=f"database unavailable: {exc}")
            raise
        except Exception as exc:
            JOBS.labels(scheduling.JOB_TYPE, "error").inc()
            cycle.fail_job(ctx.sessions, key, owner=ctx.owner, error=f"{type(exc).__name__}: {exc}")
            raise
    JOBS.labels(scheduling.JOB_TYPE, outcome.outcome).inc()
    if outcome.outcome == "approved" and outcome.edge_model_id and ctx.settings.pipeline_auto_rollout:
        _start_rollout(ctx, key, outcome.edge_model_id)
    return outcome.outcome


def _release(ctx: _Context, job_id: uuid.UUID) -> None:
    try:
        with transaction(ctx.sessions) as session:
            jobs.release(session, job_id, owner=ctx.owner)
    except OperationalError:
        log.warning("job %s: lease not released (database unavailable); it runs out by itself", job_id)


def _start_rollout(ctx: _Context, job_id: uuid.UUID, model_id: str) -> None:
    """Start the rollout of a model a job approved, with the job's plan; the job's result names it."""
    from cloud.pipeline.rollouts import RolloutPlan, start_rollout

    with transaction(ctx.sessions) as session:
        job = jobs.get_job(session, job_id, for_update=True)
        plan = job.params.get("rollout")
        try:
            rollout = start_rollout(
                session,
                model_id=model_id,
                plan=RolloutPlan.model_validate(plan) if plan else None,
                created_by=f"job {job_id}",
            )
        except ConflictError as exc:
            log.warning("job %s: no rollout of %s: %s", job_id, model_id, exc)
            job.result = {**job.result, "rollout_error": str(exc)}
            return
        job.result = {**job.result, "rollout": str(rollout.id)}
    log.info("job %s: rollout %s of %s started", job_id, rollout.id, model_id)


def enqueue(job_id: uuid.UUID) -> None:
    """Send a job's task (the API and the beat's tasks call this)."""
    run_job.apply_async(args=(str(job_id),))


@app.task(name="diredi.schedule_cycles")
def schedule_cycles() -> list[str]:
    """Start an RD cycle job for each cohort whose received knowledge is due (count or age); only the
    cohorts with news are looked at, all of them every FULL_PASS_S."""
    ctx = context()
    began, now, last = ctx.beat.clock(), utcnow(), ctx.beat.scheduled_at
    full = ctx.beat.full_due("schedule")
    since = None if full or last is None else last - JOBS_OVERLAP
    wait_s = ctx.settings.pipeline_max_wait_s
    started = []
    with transaction(ctx.sessions) as session:
        news = scheduling.cohorts_with_news(session, max_wait_s=wait_s, jobs_finished_since=since, now=now)
        due = scheduling.cohorts_due(
            session,
            min_reports=ctx.settings.pipeline_min_reports,
            max_wait_s=wait_s,
            among=None if full else news,
            now=now,
        )
        for cohort_id in due:
            started.append(scheduling.create_cycle_job(session, cohort_id=cohort_id, trigger="knowledge").id)
    ctx.beat.scheduled_at = now
    if full:
        ctx.beat.full_done("schedule", began)
    for job_id in started:  # after the commit, so the worker finds the job
        enqueue(job_id)
        log.info("job %s started for received knowledge", job_id)
    return [str(j) for j in started]


@app.task(name="diredi.reap_jobs")
def reap_jobs() -> list[str]:
    """Send again the jobs whose worker died (lease ran out) or whose task was lost; fail a job that
    has been claimed MAX_ATTEMPTS times without finishing (it kills its workers)."""
    ctx = context()
    again = []
    with transaction(ctx.sessions) as session:
        stale = jobs.stale_jobs(
            session, types=[scheduling.JOB_TYPE], pending_for=2 * ctx.settings.job_lease_seconds
        )
        for job in stale:
            if job.attempts >= MAX_ATTEMPTS:
                jobs.finish(
                    session,
                    job.id,
                    state=JobState.failed,
                    error=f"gave up after {job.attempts} attempts whose workers died",
                )
                continue
            jobs.requeue(session, job.id, hold_s=REQUEUE_HOLD_S)
            again.append(job.id)
    for job_id in again:
        enqueue(job_id)
        REQUEUED.inc()
        log.warning("job %s sent again: its worker stopped renewing its lease", job_id)
    return [str(j) for j in again]


def _with_publisher(reason: str, work: Any) -> int:
    ctx = context()
    with ctx.publisher_lock:
        try:
            return int(work(ctx.sessions, _Publisher(ctx, reason)))
        except PublishError:
            ctx.drop_publisher()  # the next pass reconnects and publishes the same decisions again
            raise


def _beat_pass(task: str, reason: str, work: Any) -> int:
    """A pass of the beat that looks at what changed, or at everything when FULL_PASS_S has gone by
    since this process last did (or never did): `work(sessions, publisher, full)`."""
    ctx = context()
    began, full = ctx.beat.clock(), ctx.beat.full_due(task)
    done = _with_publisher(reason, lambda sessions, publisher: work(sessions, publisher, full))
    if full:  # not if it failed: the next pass looks at everything again
        ctx.beat.full_done(task, began)
    return done


@app.task(name="diredi.advance_rollouts")
def advance_rollouts() -> int:
    """One pass of the rollout engine; returns how many rollouts it moved."""
    from cloud.pipeline.rollouts import advance_rollouts as advance

    return _beat_pass(
        "advance", "rollout", lambda sessions, publisher, full: len(advance(sessions, publisher, full=full))
    )


@app.task(name="diredi.reconcile_desired")
def reconcile_desired() -> int:
    """Give devices outside a rollout their cohort's current model; returns how many got it."""
    from cloud.pipeline.rollouts import reconcile_desired as reconcile

    return _beat_pass(
        "reconcile", "reconcile", lambda sessions, publisher, full: reconcile(sessions, publisher, full=full)
    )


class CommandPublisher(Protocol):
    """What `send_commands` needs of a publisher; `cloud.publisher.CloudPublisher` is one."""

    def send_command(
        self, device_id: str, command: CommandName, *, msg_id: uuid.UUID | None, expires_at: datetime | None
    ) -> object: ...


COMMAND_RESEND = timedelta(minutes=1)  # a sent command not answered by then is sent again (same msg_id)


def deliver_commands(
    sessions: sessionmaker[Session], publisher: CommandPublisher, *, now: datetime | None = None
) -> tuple[int, int]:
    """Expire the commands whose time ran out and publish the due ones of online devices (marked sent
    as they go); returns (sent, expired). Published outside the transaction: no row is locked while
    the broker answers. A PublishError leaves the rest for the next pass."""
    now = now or utcnow()
    with transaction(sessions) as session:
        expired = commands.expire_due(session, now=now)
        due = [
            (c.id, c.device_id, c.command, c.expires_at)
            for c in commands.pending_for(session, now=now, resend_after=COMMAND_RESEND)
        ]
    sent: list[uuid.UUID] = []
    try:
        for command_id, device_id, name, expires_at in due:
            publisher.send_command(device_id, name, msg_id=command_id, expires_at=expires_at)
            sent.append(command_id)
    finally:
        with transaction(sessions) as session:
            commands.mark_sent(session, command_ids=sent, now=now)
    return len(sent), expired


@app.task(name="diredi.send_commands")
def send_commands() -> int:
    """Publish pending commands of devices that are online and expire stale ones; returns how many
    were sent."""
    return _with_publisher("command", lambda sessions, publisher: deliver_commands(sessions, publisher)[0])


@app.task(name="diredi.distribute_trust")
def distribute_trust() -> int:
    """Publish the trust chain (retained) when it has a version this process has not published, and
    make a staged signing key active once every active device reports the trust version that added
    it; returns the published trust version."""
    ctx = context()
    ring = KeyRing.open(ctx.settings.resolved_signing_key_dir)
    chain = ring.trust_chain()
    if ctx.trust_published != chain.latest.version:
        with ctx.publisher_lock:
            try:
                ctx.publish().publish_trust(chain)
            except PublishError:
                ctx.drop_publisher()
                raise
        ctx.trust_published = chain.latest.version
        log.info("published trust version %d", chain.latest.version)
    staged = ring.staged()
    if staged is not None:
        key_id, version = staged
        with ctx.sessions() as session:
            behind = behind_on_trust(session, version)
        if behind == 0:
            ring.activate(key_id)
            log.warning(
                "every active device trusts key %s (trust version %d): it signs from now on", key_id, version
            )
        else:
            log.info("key %s waits for %d devices to report trust version %d", key_id, behind, version)
    return chain.latest.version


@app.task(name="diredi.reconcile_broker")
def reconcile_broker() -> int:
    """Apply to the broker what the registry holds and the broker does not yet (a revocation made while
    it was down), and sweep the whole broker every `BROKER_SWEEP_S`; returns the devices applied."""
    ctx = context()
    if ctx.broker_hook is None:
        ctx.broker_hook = hook_from_settings(ctx.settings, ctx.sessions)
        if ctx.broker_hook is None:
            return 0  # no broker is managed
    sweep = ctx.last_sweep is None or time.monotonic() - ctx.last_sweep >= BROKER_SWEEP_S
    try:
        done = reconcile(ctx.sessions, ctx.broker_hook, sweep=sweep)
    except HookError as exc:
        log.warning("the broker could not be reconciled: %s", exc)
        return 0
    if sweep and not done.failed:
        ctx.last_sweep = time.monotonic()
    return len(done.applied)


@app.task(name="diredi.reissue_crl")
def reissue_crl() -> int:
    """Re-issue the fleet CA's CRL from the registry (and reload the broker), well before its next update:
    past it, the broker refuses every certificate device. Nothing while no fleet CA exists; returns
    the certificates it lists."""
    ctx = context()
    publisher = crl_from_settings(ctx.settings, ctx.sessions)
    if not publisher.exists:
        return 0
    try:
        published = publisher.publish()
    except HookError as exc:
        log.error("the CRL was not re-issued: %s", exc)
        return 0
    return published.revoked


@app.task(name="diredi.prune_telemetry")
def prune_telemetry() -> int:
    """Make telemetry's daily partitions ahead (PostgreSQL), then remove what is older than the
    retention setting; returns the samples removed."""
    ctx = context()
    retention = timedelta(days=ctx.settings.telemetry_retention_days)
    with ctx.sessions() as session:
        made = partitions.create_ahead(session)
        pruned = telemetry.remove_expired(session, retention=retention)
    if made:
        log.info("made telemetry partitions %s", ", ".join(made))
    dropped = ", ".join(f"{d.name} ({d.rows} rows)" for d in pruned.dropped) or "none"
    log.info(
        "pruned %d telemetry rows: %d deleted, partitions dropped: %s", pruned.rows, pruned.deleted, dropped
    )
    return pruned.rows
