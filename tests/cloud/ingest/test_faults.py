"""Nothing is lost end to end (DESIGN §2): `diredi ingest` processes on the session's mosquitto and a
PostgreSQL registry, scripted devices sending knowledge reports under the receipt protocol, and
SIGKILL for the ingest or the broker in the middle of the stream. Afterwards every report is stored
exactly once and every device has its receipts.

Each test's ingests use a shared-subscription group of their own (so no other test's persistent
ingest session takes a share of these messages) and their broker sessions are discarded afterwards.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.children import free_ports
from cloud.ingest.service import Ingest
from cloud.registry import migrate
from cloud.registry.db import make_engine, session_factory
from cloud.registry.tables import KnowledgeReport, Telemetry
from tests.brokers import RunningBroker
from tests.cloud.factories import knowledge_payload
from tests.cloud.ingest.device_script import (
    Enrolled,
    ScriptedDevice,
    end_session,
    enrol,
    wait_all_receipted,
)
from tests.databases import postgres_admin_url
from tests.polling import wait_until
from testsupport.postgres import scratch_database

log = logging.getLogger(__name__)

DIREDI = Path(sys.executable).with_name("diredi")
RESEND_AFTER = 2.0  # the devices' receipt timeout: short, so that a lost receipt costs seconds
RECEIPTS_WAIT = 60.0  # the longest any test waits for the last receipt (a failure, not the norm)


@dataclass(frozen=True)
class Registry:
    """A migrated PostgreSQL registry of this module's own."""

    url: str
    sessions: sessionmaker[Session]
    store: LocalArtifactStore


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with scratch_database(postgres_admin_url(), prefix="diredi_faults") as url:
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
            yield Registry(
                url, session_factory(engine), LocalArtifactStore(tmp_path_factory.mktemp("artifacts"))
            )
        finally:
            engine.dispose()


class IngestProcess:
    """`diredi ingest --name NAME` as a child process; its log in the test's directory."""

    def __init__(
        self, name: str, *, broker: RunningBroker, registry: Registry, group: str, workdir: Path
    ) -> None:
        self.name = name
        self.broker = broker
        self.workdir = workdir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DIREDI_")} | {
            "DIREDI_MQTT_URL": broker.cloud.url(),
            "DIREDI_DATABASE_URL": registry.url,
            "DIREDI_DATA_DIR": str(workdir / "data"),
            "DIREDI_INGEST_GROUP": group,
            "DIREDI_INGEST_BATCH_SIZE": "50",
            "DIREDI_INGEST_BATCH_MS": "20",
        }
        self.metrics_port = 0
        self.runs = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"ingest-{self.name}-{self.runs}.log"

    def start(self, *, metrics_port: int = 0, timeout: float = 30.0) -> IngestProcess:
        """Start it and return once it is subscribed (it logs so after the broker's SUBACK)."""
        self.runs += 1
        self.metrics_port = metrics_port
        with self.log_path.open("wb") as output:
            self._process = subprocess.Popen(
                [str(DIREDI), "ingest", "--name", self.name, "--metrics-port", str(metrics_port)],
                cwd=self.workdir,  # no stray .env
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        wait_until(
            self._subscribed, timeout, lambda: f"ingest {self.name} not subscribed:\n{self.log_tail()}"
        )
        return self

    def _subscribed(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise AssertionError(
                f"ingest {self.name} exited ({self._process.returncode}):\n{self.log_tail()}"
            )
        return b"subscribed to" in self.log_path.read_bytes()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, nothing acknowledged that was not committed."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)

    def stop(self) -> None:
        """SIGTERM (it writes what it received), SIGKILL if it has not ended within 10 s."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def stored(self) -> dict[str, float]:
        """Its `diredi_ingest_stored_total`, per kind, read from its metrics endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a loopback test URL)
            text = response.read().decode()
        return {
            sample.labels["kind"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "diredi_ingest_stored_total"
        }

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture
def ingests(
    mosquitto: RunningBroker, registry: Registry, tmp_path: Path
) -> Iterator[Callable[[str], IngestProcess]]:
    """Makes ingest processes of one group of this test's own; ends them and retires their sessions."""
    group = f"faults-{secrets.token_hex(4)}"
    made: list[IngestProcess] = []

    def make(name: str) -> IngestProcess:
        ingest = IngestProcess(
            f"{group}-{name}", broker=mosquitto, registry=registry, group=group, workdir=tmp_path
        )
        made.append(ingest)
        return ingest

    yield make
    for ingest in made:
        ingest.stop()
    for ingest in made:  # what `diredi ingest --retire` does, without starting a process for it
        retired = Ingest(mosquitto.cloud, registry.sessions, name=ingest.name, group=group).retire()
        assert retired, f"ingest {ingest.name}'s broker session was not dropped"


@pytest.fixture
def fleet(mosquitto: RunningBroker, registry: Registry) -> Iterator[tuple[Enrolled, list[ScriptedDevice]]]:
    """Three enrolled devices, connected, with a short receipt timeout."""
    enrolled = enrol(registry.sessions, registry.store, mosquitto, 3)
    devices = [
        ScriptedDevice(mosquitto.as_device(d, enrolled.secrets[d]), d, resend_after=RESEND_AFTER)
        for d in enrolled.devices
    ]
    try:
        for device in devices:
            device.connect()
        yield enrolled, devices
    finally:
        for device in devices:
            device.close()
        for device in devices:
            end_session(
                mosquitto.as_device(device.device_id, enrolled.secrets[device.device_id]), device.device_id
            )


@dataclass
class Stream:
    """A background thread that sends `rounds` knowledge reports from each device, one round every
    `pace` seconds, and (optionally) `statuses_per_round` heartbeats per device and round.

    With `hold_after`, it waits after that many rounds until `release` is set: a test that injects a
    fault when enough was receipted sets it then, so the fault comes mid-stream however slowly the
    machine receipts (on a fast one the stream has not reached the hold yet, and never waits)."""

    devices: list[ScriptedDevice]
    edge_model: str
    rounds: int
    pace: float
    statuses_per_round: int = 0
    reports: list[uuid.UUID] = field(default_factory=list)
    statuses: list[uuid.UUID] = field(default_factory=list)
    hold_after: int | None = None
    release: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Stream:
        self._thread = threading.Thread(target=self._run, name="report-stream", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        for number in range(self.rounds):
            if number == self.hold_after:
                self.release.wait(RECEIPTS_WAIT)
            for device in self.devices:
                self.reports.append(device.send_report(knowledge_payload(device.device_id, self.edge_model)))
                for _ in range(self.statuses_per_round):
                    self.statuses.append(device.publish_status().msg_id)
            time.sleep(self.pace)

    @property
    def total(self) -> int:
        return self.rounds * len(self.devices)

    def join(self, timeout: float = 30.0) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), (
            f"the stream sent {len(self.reports)} of {self.total} in {timeout} s"
        )


def receipts(devices: list[ScriptedDevice]) -> int:
    return sum(len(d.tally.receipts) for d in devices)


def stored_reports(sessions: sessionmaker[Session], devices: list[ScriptedDevice]) -> dict[uuid.UUID, int]:
    """How many rows each msg_id of these devices' knowledge reports has."""
    with sessions() as session:
        rows = session.execute(
            select(KnowledgeReport.msg_id, func.count())
            .where(KnowledgeReport.device_id.in_([d.device_id for d in devices]))
            .group_by(KnowledgeReport.msg_id)
        )
        return dict(rows.tuples().all())


def assert_each_stored_once_and_receipted(
    sessions: sessionmaker[Session], devices: list[ScriptedDevice], sent: list[uuid.UUID]
) -> None:
    wait_all_receipted(devices, RECEIPTS_WAIT)
    stored = stored_reports(sessions, devices)
    assert len(sent) == len(set(sent))
    assert set(stored) == set(sent), (
        f"missing {len(set(sent) - set(stored))}, extra {len(set(stored) - set(sent))}"
    )
    assert set(stored.values()) == {1}
    assert all(not d.unreceipted() for d in devices)
    log.info(
        "%d reports stored once each; resends %d, receipts %d (for a report already receipted: %d), "
        "device connections %d",
        len(sent),
        sum(d.tally.resends for d in devices),
        receipts(devices),
        sum(d.tally.stray_receipts for d in devices),
        sum(d.tally.connects for d in devices),
    )


def test_an_ingest_killed_mid_stream_and_restarted_loses_and_duplicates_nothing(
    ingests: Callable[[str], IngestProcess],
    fleet: tuple[Enrolled, list[ScriptedDevice]],
    registry: Registry,
) -> None:
    # Prepare
    enrolled, devices = fleet
    ingest = ingests("a").start()
    stream = Stream(devices, enrolled.edge_model, rounds=30, pace=0.05, hold_after=15).start()
    wait_until(
        lambda: receipts(devices) >= 15, 30, lambda: f"{receipts(devices)} receipts of 15 before the kill"
    )

    # Execute: SIGKILL while the devices publish, then the same --name again (its broker session)
    ingest.kill()
    sent_while_alive = len(stream.reports)
    stream.release.set()
    ingest.start()
    stream.join()

    # Assert
    assert sent_while_alive < stream.total, "the stream ended before the kill: nothing was mid-stream"
    assert_each_stored_once_and_receipted(registry.sessions, devices, stream.reports)
    assert len(stream.reports) == 90
    # What reached the broker while no ingest ran waited in the session the restart took up again.
    assert "session present: True" in ingest.log_path.read_text(), ingest.log_tail()


def test_a_broker_killed_mid_stream_and_restarted_loses_and_duplicates_nothing(
    ingests: Callable[[str], IngestProcess],
    fleet: tuple[Enrolled, list[ScriptedDevice]],
    registry: Registry,
    mosquitto: RunningBroker,
) -> None:
    # Prepare
    enrolled, devices = fleet
    ingests("a").start()
    stream = Stream(devices, enrolled.edge_model, rounds=30, pace=0.05, hold_after=15).start()
    wait_until(
        lambda: receipts(devices) >= 15, 30, lambda: f"{receipts(devices)} receipts of 15 before the kill"
    )

    # Execute: SIGKILL mosquitto (what it acknowledged but did not save is gone), start it again
    try:
        mosquitto.kill()
        sent_while_up = len(stream.reports)
        stream.release.set()
        time.sleep(0.5)
    finally:
        mosquitto.start()  # the session's broker: other tests need it back whatever happened here
    for device in devices:
        device.wait_ready(30)
    stream.join()

    # Assert
    assert sent_while_up < stream.total, "the stream ended before the kill: nothing was mid-stream"
    assert_each_stored_once_and_receipted(registry.sessions, devices, stream.reports)
    assert all(d.tally.connects >= 2 for d in devices)


def test_two_ingests_on_one_shared_subscription_store_every_message_once_between_them(
    ingests: Callable[[str], IngestProcess],
    fleet: tuple[Enrolled, list[ScriptedDevice]],
    registry: Registry,
) -> None:
    # Prepare
    enrolled, devices = fleet
    ports = free_ports(2)
    pair = [ingests(name).start(metrics_port=port) for name, port in zip("ab", ports, strict=True)]

    # Execute: 3 devices × 10 rounds of one report and three heartbeats
    stream = Stream(devices, enrolled.edge_model, rounds=10, pace=0.02, statuses_per_round=3).start()
    stream.join()

    # Assert
    wait_all_receipted(devices, RECEIPTS_WAIT)
    statuses = len(stream.statuses)

    def all_statuses() -> bool:
        return sum(i.stored().get("status", 0) for i in pair) >= statuses

    wait_until(
        all_statuses, RECEIPTS_WAIT, lambda: f"stored {[i.stored() for i in pair]} of {statuses} statuses"
    )
    counts = [i.stored() for i in pair]
    log.info("stored per ingest: %s", counts)
    for kind, sent in (("status", statuses), ("knowledge", len(stream.reports))):
        shares = [c.get(kind, 0) for c in counts]
        assert sum(shares) == sent and min(shares) > 0, f"{kind}: {shares} of {sent}"
    with registry.sessions() as session:
        ids = [d.device_id for d in devices]
        telemetry = list(session.scalars(select(Telemetry.msg_id).where(Telemetry.device_id.in_(ids))))
    assert sorted(telemetry) == sorted(stream.statuses)
    assert set(stored_reports(registry.sessions, devices)) == set(stream.reports)
