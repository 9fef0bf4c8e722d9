"""Commands end to end, with real parts: mosquitto with the production configuration, the API (with the
broker hook) provisioning a device and publishing its command, the ingest storing the device's result,
the worker's pass sending what waited for a device to come online, and a real device daemon."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from broker.dynsec import DynsecAdmin
from cloud.api.main import create_app
from cloud.broker_hook import BrokerCredentialHook
from cloud.ingest.service import Ingest
from cloud.publisher import CloudPublisher
from cloud.registry import apikeys, migrate
from cloud.registry.db import make_engine, session_factory
from cloud.registry.devices import create_cohort
from cloud.registry.tables import Role
from cloud.settings import Settings
from cloud.signing import KeyRing
from cloud.worker.tasks import deliver_commands
from tests.brokers import RunningBroker, running_mosquitto
from tests.device.daemons import DaemonProcess
from tests.polling import wait_until
from tests.system.harness import provisioned_daemon, serving

WAIT_S = 30.0
DEVICE = "porch-cam-1"


@dataclass
class System:
    """The cloud's parts, a device provisioned through the API, and its daemon (not started)."""

    broker: RunningBroker
    sessions: sessionmaker[Session]
    settings: Settings
    api: httpx.Client
    daemon: DaemonProcess

    def command(self, command_id: str) -> dict[str, Any]:
        reply = self.api.get(f"/api/v1/devices/{DEVICE}/commands/{command_id}")
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def wait_finished(self, command_id: str) -> dict[str, Any]:
        """The command once the registry shows it finished."""

        def finished() -> dict[str, Any] | None:
            command = self.command(command_id)
            return command if command["finished_at"] is not None else None

        done = wait_until(
            finished, WAIT_S, lambda: f"the command is {self.command(command_id)}:\n" + self.daemon.tail()
        )
        assert done is not None  # wait_until returns only what is true
        return done

    def start_online(self) -> None:
        """Start the daemon and wait until the registry shows it online."""
        self.daemon.start()
        wait_until(
            lambda: self.api.get(f"/api/v1/devices/{DEVICE}").json()["presence"] == "online",
            WAIT_S,
            lambda: "the device did not come online:\n" + self.daemon.tail(),
        )


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    (tmp_path / "broker").mkdir()
    with running_mosquitto(tmp_path / "broker") as broker, DynsecAdmin(broker.admin) as admin:
        settings = Settings(
            data_dir=tmp_path / "cloud",
            database_url=f"sqlite:///{tmp_path / 'registry.db'}",
            mqtt_url=SecretStr(broker.cloud.url()),
            api_tune_gc=False,
        )
        engine = make_engine(settings.resolved_database_url)
        migrate.upgrade(engine)
        sessions = session_factory(engine)
        with sessions() as session, session.begin():
            create_cohort(session, cohort_id="porch")
            _, key = apikeys.create_key(session, role=Role.operator, name="system test")
        ingest = Ingest(broker.cloud, sessions, name="commands", batch_ms=10)
        ingest.start()
        try:
            assert ingest.wait_subscribed(WAIT_S), "the ingest did not subscribe"
            app = create_app(settings, hooks=[BrokerCredentialHook(admin)])
            with (
                serving(app) as api_url,
                httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}) as api,
            ):
                answer = api.post("/api/v1/devices", json={"id": DEVICE, "cohort_id": "porch"})
                assert answer.status_code == 201, answer.text
                stream = (np.zeros((4, 8), dtype=np.float32), np.zeros(4, dtype=np.int64))
                daemon = provisioned_daemon(
                    tmp_path / "device", broker.target, answer.json(), api_url=api_url, stream=stream
                )
                try:
                    yield System(broker, sessions, settings, api, daemon)
                finally:
                    daemon.kill()
        finally:
            ingest.stop()
            engine.dispose()


def test_a_report_now_posted_to_the_api_is_run_by_the_device_and_its_result_is_shown_done(
    system: System,
) -> None:
    # Prepare
    system.start_online()

    # Execute
    created = system.api.post(f"/api/v1/devices/{DEVICE}/commands", json={"command": "report_now"})

    # Assert: sent at once, then answered by the device and stored by the ingest.
    assert created.status_code == 201, created.text
    command = created.json()
    assert command["state"] == "sent" and command["send_count"] == 1
    done = system.wait_finished(command["id"])
    assert (done["state"], done["detail"]) == ("done", "status published"), done
    assert done["result_msg_id"] is not None
    listed = system.api.get(f"/api/v1/devices/{DEVICE}/commands").json()
    assert [c["id"] for c in listed["items"]] == [command["id"]]
    assert f"command report_now ({command['id']}): done" in system.daemon.log()


def test_the_workers_pass_sends_a_waiting_command_once_the_device_is_online_and_expires_a_stale_one(
    system: System,
) -> None:
    # Prepare: two commands while the device is offline; one lives 10 s.
    waiting = system.api.post(f"/api/v1/devices/{DEVICE}/commands", json={"command": "run_rd"}).json()
    short = system.api.post(
        f"/api/v1/devices/{DEVICE}/commands", json={"command": "report_now", "ttl_s": 10}
    ).json()
    assert (waiting["state"], short["state"]) == ("pending", "pending")
    system.start_online()
    ring = KeyRing.open(system.settings.resolved_signing_key_dir)

    # Execute: the worker's pass, 11 s on for the registry's clock
    with CloudPublisher(system.broker.cloud, ring) as publisher:
        sent, expired = deliver_commands(
            system.sessions, publisher, now=datetime.now(UTC) + timedelta(seconds=11)
        )

    # Assert: the waiting one reached the device, which refused it (no model); the short one expired.
    assert (sent, expired) == (1, 1)
    assert system.command(short["id"])["state"] == "expired"
    refused = system.wait_finished(waiting["id"])
    assert (refused["state"], refused["detail"]) == ("refused", "no model installed: RD needs one")
    assert refused["send_count"] == 1
