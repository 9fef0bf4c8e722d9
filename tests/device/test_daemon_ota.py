"""Updates through the running daemon: a signed desired model published (retained) by the cloud's
publisher on a real mosquitto, the artifact downloaded from the real API (`diredi api`) with the
device's credentials, installed, acknowledged and recorded by the real ingest; and SIGTERM in the
middle of a download, after which the old model still serves and the next start installs the new one.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from broker.acl import provision_commands
from broker.dynsec import DynsecAdmin
from cloud.artifacts import LocalArtifactStore
from cloud.children import free_ports
from cloud.ingest.service import Ingest
from cloud.ml.families import NetSpec
from cloud.pipeline.lines import register_line
from cloud.publisher import CloudPublisher
from cloud.registry import migrate, models
from cloud.registry.db import make_engine, session_factory
from cloud.registry.devices import create_cohort, provision_device
from cloud.registry.tables import Device, ModelAck
from cloud.signing import KeyRing
from device_firmware_py.config import ExitCode
from device_firmware_py.daemon import STATE_FILES
from device_firmware_py.ota import ModelSlots
from tests.brokers import RunningBroker, running_mosquitto
from tests.databases import postgres_admin_url
from tests.device.artifacts import DEVICE, SECRET, ArtifactServer
from tests.device.daemons import DaemonProcess, install_model, wait_until, write_config, write_stream
from testsupport.postgres import scratch_database

DIREDI = Path(sys.executable).with_name("diredi")


@dataclass(frozen=True)
class Cloud:
    """A PostgreSQL registry with the base line's v1 and v2, its artifact store, and a signing key ring."""

    url: str
    sessions: sessionmaker[Session]
    artifacts: Path
    ring: KeyRing


@pytest.fixture(scope="module")
def cloud(
    tmp_path_factory: pytest.TempPathFactory, base_line: Any, small_data: Any, v2: Any
) -> Iterator[Cloud]:
    directory = tmp_path_factory.mktemp("cloud")
    with scratch_database(postgres_admin_url(), prefix="diredi_device_ota") as url:
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
            sessions = session_factory(engine)
            store = LocalArtifactStore(directory / "artifacts")
            with sessions() as session, session.begin():
                create_cohort(session, cohort_id=base_line.line)
                teacher, edge = register_line(
                    session, store, base_line, NetSpec(num_classes=small_data.num_classes)
                )
                models.register_edge_model(
                    session,
                    store,
                    model=v2.model,
                    manifest=v2.manifest,
                    teacher_id=teacher.id,
                    parent_id=edge.id,
                )
            yield Cloud(url, sessions, directory / "artifacts", KeyRing.open(directory / "keys"))
        finally:
            engine.dispose()


@dataclass
class Site:
    """One device's own mosquitto, an ingest, and the daemon (not yet started) on v1."""

    broker: RunningBroker
    daemon: DaemonProcess
    device_id: str
    directory: Path

    def acks(self, sessions: sessionmaker[Session]) -> list[tuple[str, str]]:
        with sessions() as session:
            rows = session.execute(
                select(ModelAck.model_id, ModelAck.result).where(ModelAck.device_id == self.device_id)
            )
            return [(model_id, str(result.value)) for model_id, result in rows]

    def active_model(self) -> str | None:
        active = ModelSlots(self.directory / "state" / STATE_FILES["models"]).active()
        return None if active is None else active[1].model_id


@contextlib.contextmanager
def site(
    directory: Path, cloud: Cloud, base_line: Any, small_data: Any, *, device_id: str, api_url: str
) -> Iterator[Site]:
    """Provision `device_id` (registry and broker, one secret) and get its daemon ready on v1."""
    with running_mosquitto(directory / "broker") as broker:
        with cloud.sessions() as session, session.begin():
            _, secret = provision_device(session, device_id=device_id, cohort_id=base_line.line)
        # The API checks the registry's secret; the test artifact server knows only DEVICE's SECRET.
        secret = SECRET if device_id == DEVICE else secret
        with DynsecAdmin(broker.admin) as admin:
            admin.execute(provision_commands(device_id, secret))
        pool = small_data.users[0].device_train[0]
        stream = write_stream(directory / "stream.npz", pool.x, pool.y)
        install_model(directory, base_line.artifact.model, base_line.artifact.manifest)
        trust = {key_id: base64.b64encode(key).decode() for key_id, key in cloud.ring.trusted().items()}
        config = write_config(
            directory,
            broker.target,
            device_id,
            secret,
            stream,
            trust=trust,
            api_url=api_url,
            feedback_every=0,
        )
        ingest = Ingest(broker.cloud, cloud.sessions, name=device_id, group=f"g-{device_id}", batch_ms=10)
        ingest.start()
        assert ingest.wait_subscribed(20), "the ingest did not subscribe"
        daemon = DaemonProcess(config, directory)
        try:
            yield Site(broker, daemon, device_id, directory)
        finally:
            daemon.kill()
            ingest.stop()


@pytest.fixture
def api(cloud: Cloud, tmp_path: Path) -> Iterator[str]:
    """`diredi api` on a free loopback port, serving the registry and its artifacts."""
    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIREDI_")} | {
        "DIREDI_DATABASE_URL": cloud.url,
        "DIREDI_DATA_DIR": str(tmp_path / "api-data"),
        "DIREDI_ARTIFACT_DIR": str(cloud.artifacts),
    }
    with (tmp_path / "api.log").open("wb") as log:
        process = subprocess.Popen(  # noqa: S603
            [str(DIREDI), "api", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):  # noqa: S310 (loopback)
                return True
        except OSError:
            assert process.poll() is None, (tmp_path / "api.log").read_text()
            return False

    try:
        wait_until(healthy, 60, lambda: (tmp_path / "api.log").read_text())
        yield url
    finally:
        process.terminate()
        process.wait(20)


def test_a_desired_model_is_downloaded_from_the_api_installed_and_acknowledged(
    tmp_path: Path, cloud: Cloud, api: str, base_line: Any, small_data: Any, v2: Any
) -> None:
    # Prepare: the device runs v1; the registry wants it on v2 (which offers it the artifact)
    device_id = f"cam-{uuid.uuid4().hex[:8]}"
    with site(tmp_path, cloud, base_line, small_data, device_id=device_id, api_url=api) as device:
        with cloud.sessions() as session, session.begin():
            session.execute(
                update(Device).where(Device.id == device_id).values(desired_model_id=v2.manifest.model_id)
            )
        device.daemon.start()

        # Execute: the cloud publishes the signed desired document, retained
        with CloudPublisher(device.broker.cloud, cloud.ring) as publisher:
            publisher.publish_desired(device_id, v2.manifest)
        acks = wait_until(lambda: device.acks(cloud.sessions), 60, lambda: device.daemon.tail())
        # the ingest stores the ack before it sends the receipt back: wait for that too
        receipted = wait_until(device.daemon.receipted, 30, lambda: device.daemon.tail())
        exit_code = device.daemon.terminate()

        # Assert: installed, acknowledged through the ingest, receipted, and v2 serves
        assert acks == [(v2.manifest.model_id, "installed")]
        assert receipted
        assert exit_code == ExitCode.OK
        assert device.active_model() == v2.manifest.model_id


def test_sigterm_during_a_download_keeps_the_old_model_and_the_next_start_installs(
    tmp_path: Path, cloud: Cloud, artifact_server: ArtifactServer, base_line: Any, small_data: Any, v2: Any
) -> None:
    # Prepare: an artifact server that sends the first bytes and then stalls
    artifact_server.offer(v2, mode="stall")
    with site(
        tmp_path, cloud, base_line, small_data, device_id=DEVICE, api_url=artifact_server.url
    ) as device:
        device.daemon.start()
        with CloudPublisher(device.broker.cloud, cloud.ring) as publisher:
            publisher.publish_desired(DEVICE, v2.manifest)
        wait_until(lambda: artifact_server.requests, 60, lambda: device.daemon.tail())

        # Execute: systemd stops the daemon mid-download; later it starts again, and the server is fine
        started = time.monotonic()
        exit_code = device.daemon.terminate()
        stop_seconds = time.monotonic() - started
        on_restart_before = device.active_model()
        artifact_server.offer(v2)
        device.daemon.start()
        acks = wait_until(lambda: device.acks(cloud.sessions), 60, lambda: device.daemon.tail())

        # Assert: a prompt clean stop with v1 intact, then v2 from the retained document
        assert exit_code == ExitCode.OK and stop_seconds < 10
        assert on_restart_before == base_line.model_id
        assert acks == [(v2.manifest.model_id, "installed")]
        assert device.active_model() == v2.manifest.model_id
