"""The Celery application: its broker (Redis in production, an SQLite file embedded), the delivery
guarantees the pipeline relies on, and the periodic tasks its beat sends.

Delivery: a task is acknowledged only when it has finished (`acks_late`), and one a worker process
died running goes back to the queue (`reject_on_worker_lost`). Redis gives an unacknowledged message
to another worker only after its visibility timeout, which must exceed the longest task, or a slow
job would run twice; it is set to twice the hard time limit of a job. A job whose worker was killed
does not wait that long: its lease in the registry runs out within `job_lease_seconds`, and the beat's
`reap_jobs` sends it again (`cloud.registry.jobs`). kombu's SQLAlchemy transport (the embedded queue)
loses a message a killed worker held; the lease brings that job back the same way.
"""

from __future__ import annotations

from celery import Celery

from cloud.settings import Settings

JOB_TIME_LIMIT_S = 30 * 60  # the longest an RD cycle may run (one takes a minute on 2 cores)
QUEUE = "diredi"

# name → (task, period in seconds)
BEAT = {
    "schedule-cycles": ("diredi.schedule_cycles", 5.0),
    "reap-jobs": ("diredi.reap_jobs", 15.0),
    "advance-rollouts": ("diredi.advance_rollouts", 2.0),  # it sets the pace of the waves
    "send-commands": ("diredi.send_commands", 3.0),  # how long a device back online waits for its commands
    "reconcile-desired": ("diredi.reconcile_desired", 30.0),
    "distribute-trust": ("diredi.distribute_trust", 15.0),
    "reconcile-broker": ("diredi.reconcile_broker", 15.0),
    "reissue-crl": ("diredi.reissue_crl", 86400.0),  # its next update is 30 days out
    "prune-telemetry": ("diredi.prune_telemetry", 3600.0),
}


def make_app(queue_url: str) -> Celery:
    """The Celery app on a queue (`Settings.resolved_queue_url`)."""
    app = Celery("diredi", broker=queue_url, include=["cloud.worker.tasks"])
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # outcomes and progress live on the job rows
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_time_limit=JOB_TIME_LIMIT_S,
        worker_prefetch_multiplier=1,  # a worker busy training holds no other task back
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # Redis's own option; kombu's SQLAlchemy transport takes none (it hands them to the engine).
        broker_transport_options=(
            {"visibility_timeout": 2 * JOB_TIME_LIMIT_S} if queue_url.startswith("redis") else {}
        ),
        timezone="UTC",
        beat_schedule={
            # A periodic task that could not run in its period is dropped, not queued up behind others.
            name: {"task": task, "schedule": period, "options": {"expires": period}}
            for name, (task, period) in BEAT.items()
        },
    )
    return app


app = make_app(Settings().resolved_queue_url)
