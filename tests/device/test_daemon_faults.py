"""Faults around the daemon, each against a real mosquitto and the real ingest into a PostgreSQL
registry: the broker down at start, the broker killed mid-run, the daemon killed with SIGKILL while
reports wait in its spool. Each ends with every knowledge report the daemon made stored exactly
once and receipted, its spool empty, and its model serving.

The daemon runs as a process; its simulated user labels every sample, so it reports every
`NEW_SAMPLES` samples. To end a test, it is stopped (SIGTERM) and started again quiet (no more
feedback, no more reports) to deliver what its spool still holds.
"""

from __future__ import annotations

import secrets
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.ingest.service import Ingest
from cloud.ml.families import NetSpec
from cloud.pipeline.lines import register_line
from cloud.registry import migrate
from cloud.registry.db import make_engine, session_factory
from cloud.registry.devices import create_cohort, provision_device
from cloud.registry.tables import KnowledgeReport
from device_firmware_py.config import ExitCode
from device_firmware_py.daemon import STATE_FILES
from device_firmware_py.ota import ModelSlots
from device_firmware_py.spool import Spool
from tests.brokers import RunningBroker, provisioned_device, running_mosquitto
from tests.databases import postgres_admin_url
from tests.device.daemons import DaemonProcess, install_model, wait_until, write_config, write_stream
from testsupport.postgres import scratch_database

NEW_SAMPLES = 10  # a report every 10 labelled samples: the stream's 100 make 10 reports
KEY = {"0123456789abcdef": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}  # no update in these tests


@dataclass(frozen=True)
class Registry:
    sessions: sessionmaker[Session]
    cohort: str
    model_id: str


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, base_line: Any, small_data: Any) -> Iterator[Registry]:
    """A PostgreSQL registry of this module's own, with the base line registered as its cohort's model."""
    with scratch_database(postgres_admin_url(), prefix="diredi_device_faults") as url:
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
            sessions = session_factory(engine)
            store = LocalArtifactStore(tmp_path_factory.mktemp("artifacts"))
            with sessions() as session, session.begin():
                create_cohort(session, cohort_id=base_line.line)
                register_line(session, store, base_line, NetSpec(num_classes=small_data.num_classes))
            yield Registry(sessions, base_line.line, base_line.model_id)
        finally:
            engine.dispose()


@dataclass
class Rig:
    """One device's daemon, its own mosquitto, and an ingest."""

    broker: RunningBroker
    daemon: DaemonProcess
    device_id: str
    directory: Path
    quiet_config: Path

    def stored(self, sessions: sessionmaker[Session]) -> list[uuid.UUID]:
        with sessions() as session:
            query = select(KnowledgeReport.msg_id).where(KnowledgeReport.device_id == self.device_id)
            return list(session.scalars(query))


@pytest.fixture
def rig(tmp_path: Path, registry: Registry, base_line: Any, small_data: Any) -> Iterator[Rig]:
    with running_mosquitto(tmp_path / "broker") as broker:
        device_id = f"cam-{secrets.token_hex(4)}"
        with registry.sessions() as session, session.begin():
            provision_device(session, device_id=device_id, cohort_id=registry.cohort)
        secret = provisioned_device(broker, device_id)
        pool = small_data.users[0].device_train[0]
        stream = write_stream(tmp_path / "stream.npz", pool.x, pool.y)
        install_model(tmp_path, base_line.artifact.model, base_line.artifact.manifest)
        config = write_config(
            tmp_path, broker.target, device_id, secret, stream, trust=KEY, rate_hz=80, new_samples=NEW_SAMPLES
        )
        # The same device and state, with no more feedback and no RD: it only delivers its spool.
        quiet = write_config(
            tmp_path,
            broker.target,
            device_id,
            secret,
            stream,
            trust=KEY,
            rate_hz=80,
            feedback_every=0,
            name="quiet.toml",
        )
        ingest = Ingest(broker.cloud, registry.sessions, name=device_id, group=f"g-{device_id}", batch_ms=10)
        ingest.start()
        assert ingest.wait_subscribed(20), "the ingest did not subscribe"
        daemon = DaemonProcess(config, tmp_path)
        try:
            yield Rig(broker, daemon, device_id, tmp_path, quiet)
        finally:
            daemon.kill()
            ingest.stop()


def drain_and_check(rig: Rig, registry: Registry) -> None:
    """Stop the daemon, start it quiet until every report it made is stored and receipted, stop it
    again; then check each report is stored once, the spool is empty and the model serves."""
    assert rig.daemon.terminate() == ExitCode.OK, rig.daemon.tail()
    rig.daemon.start(rig.quiet_config)
    wait_until(lambda: rig.daemon.log().count(" started, serving ") == rig.daemon.runs, 60, rig.daemon.tail)
    made = rig.daemon.reports()
    assert made, f"the daemon made no report:\n{rig.daemon.tail()}"
    wait_until(
        lambda: made <= rig.daemon.receipted(),
        60,
        lambda: (
            f"{len(made - rig.daemon.receipted())} of {len(made)} reports not receipted:\n{rig.daemon.tail()}"
        ),
    )
    assert rig.daemon.terminate() == ExitCode.OK, rig.daemon.tail()
    stored = rig.stored(registry.sessions)
    assert len(stored) == len(set(stored))  # each once (the registry's key makes sure)
    assert made <= set(stored)  # every report the daemon logged as spooled
    # (a report SIGKILL caught between its spooling and its log line is stored, and receipted, too)
    assert set(stored) <= made | rig.daemon.receipted()
    with Spool(rig.directory / "state" / STATE_FILES["spool"]) as spool:
        assert spool.pending() == 0
    active = ModelSlots(rig.directory / "state" / STATE_FILES["models"]).active()
    assert active is not None and active[1].model_id == registry.model_id


def test_broker_down_at_start(rig: Rig, registry: Registry) -> None:
    # Prepare: no broker
    rig.broker.kill()

    # Execute: the daemon starts, serves and reports into its spool; then the broker comes
    rig.daemon.start()
    wait_until(lambda: len(rig.daemon.reports()) >= 3, 60, lambda: f"no reports made:\n{rig.daemon.tail()}")
    assert not rig.stored(registry.sessions)
    rig.broker.start()
    wait_until(lambda: rig.daemon.receipted(), 60, lambda: f"nothing delivered:\n{rig.daemon.tail()}")

    # Assert
    drain_and_check(rig, registry)


def test_broker_killed_and_restarted_mid_run(rig: Rig, registry: Registry) -> None:
    # Prepare: reports flowing
    rig.daemon.start()
    wait_until(
        lambda: len(rig.stored(registry.sessions)) >= 2, 60, lambda: f"none stored:\n{rig.daemon.tail()}"
    )

    # Execute: kill -9 the broker (acknowledged messages in its memory are lost), then start it again
    rig.broker.kill()
    before = len(rig.daemon.reports())
    wait_until(lambda: len(rig.daemon.reports()) >= before + 3, 60, "no reports while the broker was down")
    rig.broker.start()
    after = len(rig.daemon.reports())
    wait_until(
        lambda: len(rig.stored(registry.sessions)) >= after,
        60,
        lambda: f"not delivered:\n{rig.daemon.tail()}",
    )

    # Assert
    drain_and_check(rig, registry)


def test_daemon_killed_while_reports_are_spooled(rig: Rig, registry: Registry) -> None:
    # Prepare: the broker is away, so reports pile up in the spool
    rig.broker.kill()
    rig.daemon.start()
    wait_until(lambda: len(rig.daemon.reports()) >= 3, 60, lambda: f"no reports made:\n{rig.daemon.tail()}")

    # Execute: SIGKILL the daemon; the broker comes back; the daemon starts again from its spool
    rig.daemon.kill()
    spooled = rig.daemon.reports()
    rig.broker.start()
    rig.daemon.start()
    wait_until(
        lambda: spooled <= set(rig.stored(registry.sessions)),
        60,
        lambda: f"spooled reports not delivered after the restart:\n{rig.daemon.tail()}",
    )

    # Assert
    drain_and_check(rig, registry)


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (the daemon installs one first thing in main)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def test_sigterm_during_start_up_is_a_clean_stop(rig: Rig) -> None:
    # Execute: systemd stops the daemon while it is still importing and loading its model (once its
    # handler is there: a SIGTERM before the interpreter reached main kills any Python program)
    rig.daemon.start()
    assert rig.daemon.process is not None
    pid = rig.daemon.process.pid
    wait_until(lambda: catches_sigterm(pid), 30, lambda: f"no SIGTERM handler yet:\n{rig.daemon.tail()}")
    exit_code = rig.daemon.terminate()

    # Assert
    assert exit_code == ExitCode.OK, rig.daemon.tail()
