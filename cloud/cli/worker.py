"""`diredi worker`: a Celery worker of the pipeline (and, with --beat, the one that sends the periodic
tasks), until SIGTERM or Ctrl-C; a running job is finished first (or taken up again by another worker
once its lease runs out, if this one is killed)."""

from __future__ import annotations

import logging
import re
from typing import Annotated

import typer

from cloud.cli.common import MetricsPort, check_name, fail, load_settings, migrated_engine
from cloud.exceptions import CloudError
from cloud.filemodes import private_dir


def worker(
    name: Annotated[
        str, typer.Option(help="This worker's name, unique among the fleet's workers (its Celery node name).")
    ] = "1",
    concurrency: Annotated[
        int,
        typer.Option(
            min=1, max=32, help="Tasks run at once (threads); one training at a time, the rest wait."
        ),
    ] = 2,
    beat: Annotated[
        bool,
        typer.Option(
            "--beat/--no-beat",
            help="Also send the periodic tasks (start jobs for waiting knowledge, re-send jobs whose "
            "worker died, advance rollouts, prune telemetry). Exactly one worker of a fleet does.",
        ),
    ] = False,
    metrics_port: MetricsPort = None,
) -> None:
    """Run pipeline jobs from the queue (DIREDI_REDIS_URL, or the embedded queue in the data dir)."""
    from prometheus_client import start_http_server

    check_name(name)
    settings = load_settings()
    migrated_engine(settings).dispose()
    private_dir(settings.data_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every periodic task would log three lines every few seconds; the tasks log what they did.
    for chatty in ("celery.beat", "celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from cloud.worker import tasks
    from cloud.worker.app import app

    port = settings.worker_metrics_port if metrics_port is None else metrics_port
    if port:
        try:
            start_http_server(port, addr=settings.metrics_host, registry=tasks.METRICS)
        except OSError as exc:
            raise fail(
                CloudError(f"metrics on {settings.metrics_host} port {port}: {exc.strerror}")
            ) from None
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--hostname=diredi-{name}@%h",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        argv += ["--beat", f"--schedule={settings.data_dir / 'celerybeat-schedule'}"]
    logging.getLogger(__name__).info(
        "worker %s on %s; metrics on port %s", name, _redacted(settings.resolved_queue_url), port or "none"
    )
    app.worker_main(argv)


def _redacted(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)
