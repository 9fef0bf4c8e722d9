"""`diredi ingest`: the MQTT ingest service, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
from typing import Annotated

import typer

from cloud.cli.common import ExitCode, MetricsPort, check_name, fail, load_settings, migrated_engine
from cloud.exceptions import CloudError

STOP_DEADLINE_S = 20.0  # from SIGTERM to exit, at most (systemd's default stop timeout is 90 s)


def ingest(
    name: Annotated[
        str,
        typer.Option(
            help="This ingest's name, unique among the ingests of a fleet: its broker session "
            "(client id diredi-ingest-NAME) survives restarts under it.",
        ),
    ] = "1",
    retire: Annotated[
        bool,
        typer.Option(
            "--retire",
            help="Drop this ingest's broker session and exit: for an ingest removed for good, whose "
            "share of the group's messages the broker would otherwise keep queueing.",
        ),
    ] = False,
    metrics_port: MetricsPort = None,
) -> None:
    """Store device messages from the broker in the registry (DIREDI_MQTT_URL, the cloud's account)."""
    from prometheus_client import start_http_server

    from broker.client import BrokerTarget
    from cloud.ingest.service import Ingest
    from cloud.registry.db import session_factory
    from wire.errors import ContractError

    check_name(name)
    settings = load_settings()
    try:
        target = BrokerTarget.parse(settings.mqtt_url.get_secret_value(), ca_file=settings.mqtt_ca_file)
    except ContractError as exc:
        raise fail(CloudError(f"DIREDI_MQTT_URL: {exc}")) from None
    engine = migrated_engine(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Ingest(
        target,
        session_factory(engine),
        name=name,
        client_id=settings.mqtt_client_id,
        group=settings.ingest_group,
        batch_size=settings.ingest_batch_size,
        batch_bytes=settings.ingest_batch_bytes,
        batch_ms=settings.ingest_batch_ms,
    )
    if retire:
        if not service.retire():
            raise fail(CloudError(f"the broker {target} did not confirm; the session may remain"))
        logging.getLogger(__name__).info("ingest %s retired: its broker session is gone", name)
        return
    port = settings.ingest_metrics_port if metrics_port is None else metrics_port
    if port:
        start_http_server(port, addr=settings.metrics_host, registry=service.metrics.registry)
    log = logging.getLogger(__name__)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service.start()
    log.info(
        "ingest %s started; metrics on %s", name, f"{settings.metrics_host} port {port}" if port else "none"
    )
    while not stop.wait(1.0):
        if not service.running:
            # Exit 1, not the configuration error's 2: systemd restarts the unit on this one.
            raise fail(CloudError("the ingest's writer stopped unexpectedly (see the log)"), ExitCode.FAILED)
    log.info("ingest %s stopping", name)
    # Nothing may hold the process once it was told to stop (a thread stuck on the network or the
    # database): past the deadline every thread's stack goes to stderr (the log under `diredi up`
    # and systemd) and the process exits with 1. What it had not acknowledged comes again.
    faulthandler.dump_traceback_later(STOP_DEADLINE_S, exit=True)
    service.stop(timeout=STOP_DEADLINE_S / 2)
    faulthandler.cancel_dump_traceback_later()
    if service.running:
        log.error("ingest %s did not finish its batch in time: what it did not acknowledge comes again", name)
    else:
        log.info("ingest %s stopped", name)
